"""A run directory: everything one training run leaves behind, written so a crash is visible.

``status.json`` says running / interrupted / failed / completed. ``delta/`` and then ``metrics.json``
appear only when the run completes (each committed atomically, fs.py): ``metrics.json`` is the
run's commit record, so a directory with it and ``delta/`` is complete even if a crash kept
its last status.json from being written, and a directory without it never looks complete.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import RunError
from .fs import atomic_write_text, clean_temporaries


@dataclass
class RunDir:
    path: Path
    # Called with each record once log.jsonl has it: the trackers of train.report_to (train/tracking.py).
    listeners: list[Callable[[dict], None]] = field(default_factory=list, repr=False, compare=False)

    config = property(lambda self: self.path / "config.yaml")
    delta = property(lambda self: self.path / "delta")
    best = property(lambda self: self.path / "best")
    checkpoint = property(lambda self: self.path / "checkpoint")
    tokenizer = property(lambda self: self.path / "tokenizer")
    log = property(lambda self: self.path / "log.jsonl")

    def write_json(self, name: str, data: dict) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        atomic_write_text(self.path / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def read_json(self, name: str) -> dict:
        file = self.path / name
        if not file.is_file():
            raise RunError(f"{self.path}: no {name}; is this a deltatune run directory?")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise RunError(f"{file}: corrupted ({exc}); deltatune writes it whole or not at all, so it was "
                           "damaged or edited afterwards: restore it from a copy of the run") from exc
        if not isinstance(data, dict):
            raise RunError(f"{file}: corrupted (not a JSON object); restore it from a copy of the run")
        return data

    def set_status(self, status: str, **extra) -> None:
        self.write_json("status.json", {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    def status(self) -> str:
        return self.read_json("status.json")["status"] if (self.path / "status.json").is_file() else "missing"

    def complete(self) -> bool:
        """The run finished: its commit record and delta are in place (whatever status.json says)."""
        return (self.path / "metrics.json").is_file() and self.delta.is_dir()

    def append_log(self, record: dict) -> None:
        with open(self.log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        for listener in self.listeners:
            listener(record)

    def truncate_log(self, after_step: int) -> None:
        """On resume: drop log lines of steps that the checkpoint does not include (and a last line
        that a crash cut short)."""
        if self.log.is_file():
            lines = [line for line in self.log.read_text(encoding="utf-8").splitlines()
                     if _complete_line(line) and json.loads(line).get("step", 0) <= after_step]
            atomic_write_text(self.log, "".join(line + "\n" for line in lines))

    def require_complete(self) -> None:
        if self.complete():  # first: a complete run stays usable even if its status.json was damaged
            return
        status = self.status()
        if status == "running" and not self.alive():
            raise RunError(f"{self.path}: run was killed while it trained (its process is gone); resume it with: "
                           f"deltatune train --resume {self.path}")
        if status != "completed":
            hint = {"interrupted": f"resume it with: deltatune train --resume {self.path}",
                    "failed": f"resume it with: deltatune train --resume {self.path}",
                    "running": "it is still training; wait for it to finish"}.get(
                        status, "is this a deltatune run directory?")
            raise RunError(f"{self.path}: run is {status}, not completed; {hint}")

    def mark_running(self) -> None:
        """status.json says running, and which process on which machine, so a run killed on this machine
        can be told from one still training (``alive``)."""
        self.set_status("running", pid=os.getpid(), host=socket.gethostname())

    def alive(self) -> bool:
        """False when status.json names a process on this machine that no longer exists (the run was
        killed); True otherwise (running elsewhere, or nothing to tell)."""
        try:
            state = self.read_json("status.json")
        except (RunError, ValueError):
            return True
        if state.get("host") != socket.gethostname() or not isinstance(state.get("pid"), int):
            return True
        try:
            os.kill(state["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process
            return True
        return True


def _complete_line(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit
# The best delta's main metric per evaluation example (metrics.outcome_record), for compare's intervals and tests.
OUTCOMES = "eval_outcomes.json"
EXPORT_MANIFEST = "export.json"  # what makes a folder an export (deltatune.export), read by serve's config too


def check_safetensors(path: Path, hint: str) -> None:
    """Raise ``RunError`` (naming ``path``, what is wrong, then ``hint``: what to do) when a safetensors
    file is missing, truncated or has a damaged header. Reads only the header, so it is cheap; damage
    inside the tensor data itself is not detectable (the format has no checksum)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: missing; {hint}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise RunError(f"{path}: corrupted or truncated (the file has {size} bytes, too few for a "
                           f"safetensors header); {hint}")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_SAFETENSORS_HEADER or 8 + length > size:
            raise RunError(f"{path}: corrupted or truncated (the file has {size:,} bytes, its header claims "
                           f"{length:,} bytes of header alone); {hint}")
        try:
            header = json.loads(fh.read(length).decode("utf-8"))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise RunError(f"{path}: corrupted (its safetensors header is not readable); {hint}") from None
    if size != 8 + length + end:
        raise RunError(f"{path}: corrupted or truncated (the file has {size:,} bytes, its header describes "
                       f"{8 + length + end:,}); {hint}")


def distributed() -> bool:
    """True in every process of a multi-process launch (``accelerate launch``, ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """False only in the other processes of a multi-process launch: they train, the main one writes."""
    return not distributed() or _joined_state().is_main_process


def barrier() -> None:
    """In a multi-process launch: wait until every process gets here (nothing alone)."""
    if distributed():
        _joined_state().wait_for_everyone()


def end_launch() -> None:
    """The end of a multi-process launch: all processes meet, then close the process group in order.
    (A process that left while the main one still wrote its run would exit with the group's
    threads running, and abort: seen under load.)"""
    if distributed():
        state = _joined_state()
        state.wait_for_everyone()
        state.destroy_process_group()


def _joined_state():
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Joins the launch's process group (gloo on the CPU, nccl on GPUs). The flag is read here as
    # accelerate's Accelerator reads it, so both see the same device.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes == 1:  # each process would train alone, all into the same directory
        raise RunError(f"this process is one of WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate runs it on its "
                       "own: on a machine without GPUs set ACCELERATE_USE_CPU=1 in the launch's environment "
                       "(docs/scale.md)")
    return state


def new_run_dir(output_dir: str | None, name: str) -> RunDir:
    """A new, empty run directory. In a multi-process launch the main process creates it and the
    others receive its path (or its error), so all of them agree on one directory."""
    if not distributed():
        return _create_run_dir(output_dir, name)
    from accelerate.utils import broadcast_object_list

    shared: list = [None]
    if _joined_state().is_main_process:
        try:
            shared = [("path", str(_create_run_dir(output_dir, name).path))]
        except RunError as exc:
            shared = [("error", str(exc))]
    broadcast_object_list(shared)
    kind, value = shared[0]
    if kind == "error":
        raise RunError(value)
    return RunDir(Path(value))


def _create_run_dir(output_dir: str | None, name: str) -> RunDir:
    if output_dir:
        path = Path(output_dir)
        if path.is_dir():
            clean_temporaries(path)  # a run killed before it wrote its config leaves only these
        if path.exists() and any(path.iterdir()):
            raise RunError(f"output_dir {path} exists and is not empty; choose another or remove it")
        path.mkdir(parents=True, exist_ok=True)
        return RunDir(path)
    stem = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):  # two runs started in the same second get -2, -3, ...
        path = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            path.mkdir(parents=True)
            return RunDir(path)
        except FileExistsError:
            continue
    raise RunError(f"{stem}: too many runs with this name in one second")
