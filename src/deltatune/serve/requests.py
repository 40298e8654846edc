"""What a request to the engine is, how its answer gets back to the event loop, and why one is refused."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .generation import Sampling
from .loading import Member


@dataclass(eq=False)
class Request:
    """One call: ``op`` (classify | embed | score | generate) on a member with its ``items`` (texts; pairs
    of prompt and response; or a generation's prompt ids). One-shot answers resolve ``future``; a
    generation puts chunks (then ``None``, or an exception) on ``chunks``."""
    member: Member
    op: str
    items: list
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None
    chunks: asyncio.Queue | None = None
    sampling: Sampling | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # the caller went away (a generation's stream was closed)

    def resolve(self, value=None, error: BaseException | None = None) -> None:
        """Hand the answer (or error) to the event loop (called from the worker thread)."""
        if self.future is not None:
            self._call(_settle, self.future, value, error)
        else:
            self._call(self.chunks.put_nowait, error)

    def send(self, chunk) -> None:
        self._call(self.chunks.put_nowait, chunk)

    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the caller's event loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, value, error: BaseException | None) -> None:
    if future.done():  # cancelled by the caller
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
