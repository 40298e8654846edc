"""What the pages read about a run: its registry record and the files of its folder (the folder the registry
records for it, never a path from a request), read defensively: a file being written, damaged or missing
gives nothing rather than an error page."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fastapi import HTTPException

from .. import registry_db as db
from ..errors import RunError
from ..rundir import RunDir

RUN_ID = re.compile(r"[0-9a-f]{4,32}")
MAX_LOG_BYTES = 64 * 2**20  # a log.jsonl beyond this is read from its end


def find(run_id: str) -> dict:
    """The registry record of ``run_id`` (a full id), or a 404 page."""
    if not RUN_ID.fullmatch(run_id or ""):
        raise HTTPException(404, f"{run_id[:40]!r} is not a run id (8 hexadecimal characters, e.g. 3f2a9c1b)")
    try:
        return db.get(run_id, prefix=False)
    except RunError:
        raise HTTPException(404, f"no run {run_id} in the run registry ({db.registry_path()})") from None


def status_of(run: dict) -> str:
    """The registry's status, except that a run recorded as running whose process on this machine is gone
    (killed) is ``killed``: it will not finish by itself."""
    if run["status"] == "running" and run["kind"] in db.OWN_DIR and not RunDir(Path(run["path"])).alive():
        return "killed"
    return run["status"]


def read_json(folder: Path, name: str) -> dict:
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_text(folder: Path, name: str, limit: int = 200_000) -> str | None:
    try:
        with open(folder / name, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return None


def parse_lines(data: bytes) -> list[dict]:
    """The complete JSON lines of ``data`` (a line cut short by a writer, or damaged, is skipped)."""
    out = []
    for line in data.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_log(folder: Path) -> tuple[list[dict], int]:
    """log.jsonl's records and the byte offset its last complete line ends at (where a live view goes on)."""
    path = folder / "log.jsonl"
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            start = max(0, size - MAX_LOG_BYTES)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return [], 0
    if start:
        data = data.partition(b"\n")[2]  # the first line may be a fragment
    end = data.rfind(b"\n") + 1
    return parse_lines(data[:end]), size - len(data) + end


def read_log_from(folder: Path, offset: int, limit: int = 2**20) -> tuple[list[dict], int]:
    """The complete lines appended since ``offset``, and the offset after them. A log that got shorter
    (a resumed run drops the steps its checkpoint lacks) starts again from 0."""
    path = folder / "log.jsonl"
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < offset:
                offset = 0
            fh.seek(offset)
            data = fh.read(limit)
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return parse_lines(data[:end]), offset + end


def samples(folder: Path, limit: int = 8) -> list[dict]:
    """The first generated samples a run kept (samples.jsonl: prompt, before, after)."""
    try:
        with open(folder / "samples.jsonl", "rb") as fh:
            return parse_lines(b"".join(fh.readline() for _ in range(limit)))
    except OSError:
        return []


def delta_bytes(run: dict) -> int | None:
    if run.get("delta_bytes") is not None:
        return run["delta_bytes"]
    delta = Path(run["path"]) / "delta"
    if not delta.is_dir():
        return None
    return sum(f.stat().st_size for f in delta.rglob("*") if f.is_file())
