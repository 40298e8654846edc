"""A rich progress bar: step, loss, real tokens per second and ETA."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn


class Progress:
    def __init__(self, total: int, enabled: bool = True, label: str = "train"):
        self.enabled = enabled
        self._bar = RichProgress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TimeRemainingColumn(), console=Console(file=sys.stderr),
                                 disable=not enabled)
        self._task = self._bar.add_task("train", total=total, loss="-", tps="-")

    def __enter__(self) -> "Progress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update(self, state) -> None:
        loss = f"{state.loss:.4f}" if state.loss is not None else "-"
        tps = f"{state.tokens / state.seconds:,.0f}" if state.seconds else "-"
        self._bar.update(self._task, completed=state.step, loss=loss, tps=tps)
