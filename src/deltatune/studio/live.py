"""Live updates as server-sent events: a page opens an ``EventSource`` and gets named events (JSON data)
while something changes. Every stream is bounded: at most ``Settings.max_streams`` at once (503 beyond),
each at most ``Settings.stream_seconds`` (the browser reconnects by itself), and it ends when the client
goes away."""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Callable

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse


def event(name: str, data) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def stream(request: Request, events: Callable[[], AsyncIterator[str]]) -> StreamingResponse:
    """``events()`` as an event stream, within the app's bounds."""
    settings, slots = request.app.state.settings, request.app.state.streams
    if slots.locked():
        raise HTTPException(503, f"{settings.max_streams} live views are open already; close some tabs")

    async def body() -> AsyncIterator[str]:
        await slots.acquire()
        deadline = time.monotonic() + settings.stream_seconds
        try:
            yield "retry: 2000\n\n"
            async for chunk in events():
                yield chunk
                if time.monotonic() > deadline or await request.is_disconnected():
                    return
        finally:
            slots.release()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def ticks(request: Request) -> AsyncIterator[None]:
    """Once per poll interval until the client goes away."""
    poll = request.app.state.settings.poll_seconds
    while not await request.is_disconnected():
        yield None
        await asyncio.sleep(poll)


def to_thread(fn, *args):
    """Blocking work (SQLite, files) off the event loop."""
    return asyncio.to_thread(fn, *args)
