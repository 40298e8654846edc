"""How much of the machine other processes used while a run trained: the figure that says whether its
time is comparable with another run's (compare marks runs that shared the machine).

Linux only (``/proc/stat``): the machine's busy CPU time minus this process's own (all its threads), over
the wall time watched, in cores. Elsewhere nothing is measured and nothing is claimed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")
# A run counts as contended when other processes used more than the cores its threads left free plus this
# (an idle machine's daemons use a few hundredths of a core). Over less than MIN_SECONDS the clock ticks
# (10 ms) make the figure too coarse to judge: no verdict.
SLACK_CORES = 0.2
MIN_SECONDS = 2.0


def _busy_seconds() -> float | None:
    """CPU time the whole machine spent busy since boot (every core), or None where unknown."""
    try:
        fields = [int(v) for v in STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10])  # already counted in user and nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Watch:
    """Other processes' CPU seconds from ``start()`` to each ``lap()``, accumulated into a ``LoopState``'s
    ``other_cpu_seconds`` and ``watched_seconds`` (checkpointed, so a resumed run adds to them)."""

    def __init__(self, state) -> None:
        self.state = state
        self.start()

    def start(self) -> None:
        self.busy, self.own, self.wall = _busy_seconds(), _own_seconds(), time.monotonic()

    def lap(self) -> None:
        busy, own, wall = _busy_seconds(), _own_seconds(), time.monotonic()
        if busy is not None and self.busy is not None:
            self.state.other_cpu_seconds += max(0.0, (busy - self.busy) - (own - self.own))
            self.state.watched_seconds += wall - self.wall
        self.busy, self.own, self.wall = busy, own, wall


def report(state, threads: int) -> dict | None:
    """What metrics.json records: other processes' mean use in cores, the cores, the run's threads and
    whether it shared the machine (None: too short to tell); None when nothing was measured."""
    if state.watched_seconds <= 0:
        return None
    cores = os.cpu_count() or 1
    other = state.other_cpu_seconds / state.watched_seconds
    return {"other_cores": round(other, 3), "cores": cores, "threads": threads,
            "seconds_watched": round(state.watched_seconds, 1),
            "contended": other > max(0, cores - threads) + SLACK_CORES
            if state.watched_seconds >= MIN_SECONDS else None}
