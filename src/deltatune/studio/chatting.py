"""The Playground's model server: one ``serve.engine.Engine`` inside the studio, started on first use. Runs
load into it when a person chats with them (a base model once, each run's delta beside it, switched per
request as ``deltatune serve`` switches them); at most MAX_RUNS stay loaded, the least recently used is
unloaded first. Its worker thread runs every forward: the event loop only awaits the streamed chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import AsyncIterator

from ..errors import DeltatuneError
from ..serve.types import Sampling

log = logging.getLogger("deltatune.studio")
MAX_RUNS = 4
MAX_PROMPT_TOKENS = 1024


class Playground:
    def __init__(self):
        self.engine = None
        self._lock: asyncio.Lock | None = None
        self._used: OrderedDict[str, float] = OrderedDict()  # loaded run ids, least recently used first

    async def close(self) -> None:
        """The engine's queued and running answers finished and its worker stopped (the studio is shutting down)."""
        if self.engine is not None:
            await self.engine.drain()

    async def name_for(self, run: dict, base: bool) -> str:
        """The served name that answers for ``run`` (its id), or with ``base`` for the base model it was trained
        on; loads the run first if needed (DeltatuneError says why it cannot be served)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            engine = await self._engine()
            name = run["id"]
            if name not in {s.name for s in engine.served()}:
                await self._make_room(engine)
                await engine.load(name, run["path"])
            self._used[name] = time.monotonic()
            self._used.move_to_end(name)
            return engine.get(name).base if base else name

    async def chat(self, name: str, messages: list[dict], sampling: Sampling) -> AsyncIterator[str]:
        """The answer to ``messages`` (the run's chat template frames them, as in training), piece by piece."""
        ids = self.engine.chat_prompt(name, messages)
        stream = await self.engine.generate(name, ids, sampling)
        try:
            async for chunk in stream:
                if chunk.text:
                    yield chunk.text
        finally:
            await stream.aclose()

    async def _engine(self):
        if self.engine is None:
            from ..serve.engine import Engine  # torch: only when a person chats

            engine = Engine({}, max_batch=4, queue_size=16, max_prompt_tokens=MAX_PROMPT_TOKENS)
            await engine.start()
            self.engine = engine
        return self.engine

    async def _make_room(self, engine) -> None:
        while len(self._used) >= MAX_RUNS:
            oldest, _ = self._used.popitem(last=False)
            try:
                await engine.unload(oldest)
            except DeltatuneError:
                log.warning("studio playground: %s was not loaded any more", oldest)
