"""Commands the studio starts for a person (export a run, resume it): each is ``deltatune ...`` in a process
of its own, its output kept in a log file, so a page can show how it went and the studio never blocks on it.
At most ``limit`` run at once (the machine's cores are few); a command that cannot start is refused, never
queued without bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class Busy(Exception):
    """Too many commands are running; try again when one finishes."""


@dataclass
class Job:
    id: str
    kind: str                  # what it does, in a word: "export", "resume", ...
    argv: list[str]            # deltatune's arguments
    run_id: str | None
    log: Path
    process: subprocess.Popen = field(repr=False)
    started: float = field(default_factory=time.time)

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    @property
    def state(self) -> str:
        code = self.exit_code
        if code is None:
            return "running"
        if code == 0:
            return "finished"
        # 130: deltatune's exit after Ctrl-C (a cancel sends SIGINT); -2: killed by SIGINT before it could say so
        return "cancelled" if code in (130, -signal.SIGINT) else f"failed (exit code {code})"

    def output(self, limit: int = 4000) -> str:
        """The last ``limit`` characters the command printed."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-limit:]


class Jobs:
    def __init__(self, runs: Path, limit: int = 2):
        self.folder = Path(runs) / ".studio-jobs"
        self.limit = limit
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, argv: list[str], run_id: str | None = None) -> Job:
        """``deltatune *argv`` in its own process group (so a cancel reaches what it starts)."""
        with self._lock:
            if sum(j.exit_code is None for j in self._jobs.values()) >= self.limit:
                raise Busy(f"{self.limit} commands are already running; wait for one to finish")
            self.folder.mkdir(parents=True, exist_ok=True)
            job_id = uuid.uuid4().hex[:8]
            log = self.folder / f"{job_id}-{kind}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen([sys.executable, "-m", "deltatune.cli", *argv], stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
            job = self._jobs[job_id] = Job(job_id, kind, list(argv), run_id, log, process)
            return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def for_run(self, run_id: str) -> list[Job]:
        """The commands started for a run, newest first."""
        return sorted((j for j in self._jobs.values() if j.run_id == run_id), key=lambda j: -j.started)

    def cancel(self, job_id: str) -> bool:
        """Ctrl-C for a running command (a training run records itself as interrupted and can resume)."""
        job = self._jobs.get(job_id)
        if job is None or job.exit_code is not None:
            return False
        os.killpg(job.process.pid, signal.SIGINT)
        return True
