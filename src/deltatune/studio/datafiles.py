"""The Data page's work: which files under the data root it offers, uploads into it, and the data report
(the training pipeline's own: ``task.rows``) of a chosen file, computed one at a time and cached."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path

from fastapi import HTTPException

from ..assets import DATA_SUFFIXES

SKIP_DIRS = {".venv", "venv", "node_modules", "__pycache__", ".git", "site-packages"}
MAX_FILES = 500
MAX_DEPTH = 4
MAX_REPORT_BYTES = 200 * 2**20  # larger files: `deltatune data prepare --stream` in a terminal
COLUMN = re.compile(r"[\w .\-]{1,100}")
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_lock = threading.Lock()
_cache: OrderedDict[tuple, dict] = OrderedDict()


def data_files(root: Path) -> list[str]:
    """Data files under ``root`` (relative, sorted), skipping hidden folders and environments; at most MAX_FILES."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        for name in sorted(files):
            if Path(name).suffix.lower() in DATA_SUFFIXES and not name.startswith("."):
                found.append(str((Path(folder) / name).relative_to(root)))
                if len(found) >= MAX_FILES:
                    return found
    return found


def upload_target(root: Path, name: str) -> Path:
    """Where an uploaded file goes: ``root/uploads/<its name, made safe>``, never over an existing file."""
    base = SAFE_NAME.sub("_", Path(name.replace("\\", "/")).name).strip("._") or "upload"
    suffix = Path(base).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise HTTPException(400, f"{name[:80]!r}: upload a {', '.join(DATA_SUFFIXES)} file")
    folder = root / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    stem, target = Path(base).stem, folder / base
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{stem}-{n}{suffix}"
    return target


async def save_upload(request, target: Path, limit: int) -> int:
    """The request body into ``target`` (written whole or not at all), at most ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the file is larger than the upload limit ({limit / 2**20:.0f} MB); put it "
                                 "under the data root yourself instead")
    partial, written = target.with_name(f".{target.name}.partial"), 0
    try:
        with open(partial, "xb") as out:
            async for chunk in request.stream():
                written += len(chunk)
                if written > limit:
                    raise HTTPException(413, f"the file is larger than the upload limit ({limit / 2**20:.0f} MB)")
                out.write(chunk)
        if not written:
            raise HTTPException(400, "the uploaded file is empty")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return written


def guess_task(columns: list[str]) -> str:
    names = set(columns)
    if {"tokens", "tags"} <= names:
        return "token_classification"
    if {"prompt", "response"} <= names:
        return "causal_lm"
    return "classification"


def report_for(data_ref: str, key: tuple, task: str, columns: dict[str, str], model: str) -> dict:
    """The data report of ``data_ref`` (a file's path or a packaged data set) as the training pipeline makes it
    for ``task`` with these ``columns`` (config keys data.*_column); token lengths with ``model``'s tokenizer
    (a packaged model) or none. One report at a time; the last few are kept."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    if not _lock.acquire(timeout=120):
        raise HTTPException(503, "another data report is being computed; try again in a minute")
    try:
        report = _build(data_ref, task, columns, model)
    finally:
        _lock.release()
    _cache[key] = report
    while len(_cache) > 8:
        _cache.popitem(last=False)
    return report


def _build(data_ref: str, task: str, columns: dict[str, str], model: str) -> dict:
    from ..assets import resolve_model
    from ..configure import load_config
    from ..models import load_tokenizer
    from ..tasks import registry as tasks

    for key, value in columns.items():
        if not COLUMN.fullmatch(value):
            raise HTTPException(400, f"{key}: {value[:40]!r} is not a column name")
    overrides = [f"data.train={data_ref}", f"task={task}", "train.progress=false",
                 *(f"data.{k}={v}" for k, v in columns.items())] + ([f"model={model}"] if model else [])
    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(resolve_model(cfg.model)) if model else None
    return tasks.get(cfg.task)(cfg).rows(tokenizer).report

