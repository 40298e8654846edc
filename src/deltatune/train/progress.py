"""Progress for people and for logs.

On a terminal: a rich bar (step, loss, real tokens per second, ETA). Anywhere else (a pipe, ``nohup``,
CI): plain lines, so a log shows what the run is doing. Both print to stderr, plus one line as each
phase starts (loading, data, baseline, evaluation, saving). ``--quiet`` turns all of it off,
``--json-progress`` prints the same events as JSON lines. The command line sets the mode for its process
and the processes it starts through the ``DELTATUNE_PROGRESS`` environment variable.
"""

from __future__ import annotations

import json
import os
import sys
import time

ENV = "DELTATUNE_PROGRESS"
MODES = ("auto", "plain", "json", "off")  # auto: the bar on a terminal, plain lines elsewhere
EVERY_SECONDS = 10.0  # plain and JSON step lines: one per this many seconds, plus the first and the last


def mode() -> str:
    """``bar``, ``plain``, ``json`` or ``off`` for this process."""
    chosen = os.environ.get(ENV, "auto")
    if chosen == "auto":
        return "bar" if sys.stderr.isatty() else "plain"
    return chosen if chosen in MODES else "plain"


def phase(name: str, detail: str = "", enabled: bool = True) -> None:
    """One line as a phase starts or ends, e.g. ``phase("loading", "model minilm")``; ``enabled``
    False (``train.progress: false``) prints nothing."""
    shown = mode() if enabled else "off"
    if shown == "off":
        return
    if shown == "json":
        _emit({"event": "phase", "phase": name, "detail": detail})
    else:
        _emit_line(f"{name:<10} {detail}".rstrip())


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: an ETA a person reads at a glance."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Steps of one loop; ``update(state)`` after each (state: step, loss, tokens, seconds)."""

    def __init__(self, total: int, enabled: bool = True, label: str = "train"):
        self.total, self.label = total, label
        self.shown = mode() if enabled else "off"
        self._bar = self._task = None
        self._first_step = self._start = self._last = None
        if self.shown == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeRemainingColumn)

            self._bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                     TimeRemainingColumn(), console=Console(file=sys.stderr))
            self._task = self._bar.add_task(label, total=total, loss="-", tps="-")

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, state) -> None:
        loss = f"{state.loss:.4f}" if state.loss is not None else "-"
        tps = state.tokens / state.seconds if state.seconds else None
        if self._bar is not None:
            self._bar.update(self._task, completed=state.step, loss=loss, tps=f"{tps:,.0f}" if tps else "-")
            return
        if self.shown == "off":
            return
        now = time.monotonic()
        if self._start is None:  # a resumed loop starts counting from its first step, for the ETA
            self._first_step, self._start = state.step, now
        last = state.step >= self.total
        if self._last is not None and now - self._last < EVERY_SECONDS and not last:
            return
        self._last = now
        done = state.step - self._first_step
        eta = (self.total - state.step) * (now - self._start) / done if done else None
        if self.shown == "json":
            _emit({"event": "step", "label": self.label, "step": state.step, "total": self.total,
                   "loss": state.loss, "tokens_per_s": round(tps, 1) if tps else None,
                   "eta_s": round(eta, 1) if eta is not None else None})
            return
        percent = 100 * state.step / self.total if self.total else 100
        parts = [f"step {state.step}/{self.total} ({percent:.0f}%)", f"loss {loss}"]
        parts += [f"{tps:,.0f} tok/s"] if tps else []
        parts += [f"ETA {duration(eta)}"] if eta is not None and not last else []
        _emit_line(f"{self.label:<10} " + ", ".join(parts))


def _emit_line(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _emit(event: dict) -> None:
    print(json.dumps({"time": round(time.time(), 3), **event}), file=sys.stderr, flush=True)
