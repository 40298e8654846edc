"""Shared by the studio's Feedback and Playground tests: a prompts file, a registry record of a run that writes
text (its base model is what the Feedback page samples from; nothing trained), and waiting for a labeling
session's sampled responses through the ASGI app."""

from __future__ import annotations

import re
import time
from pathlib import Path

from deltatune import registry_db as db
from tests.conftest import write_jsonl

PROMPTS = ["what is your name", "hello", "the movie was", "what is 3 and 4"]
SAMPLING = {"max_new_tokens": "6", "temperature": "0.8", "top_p": "0.95", "seed": "0"}


def write_prompts(folder: Path, name: str = "prompts.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_jsonl(folder / name, [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])


def text_run(folder: Path, model: Path) -> str:
    """A completed causal_lm run of ``model`` as the registry records it (no delta: for its base model only)."""
    folder.mkdir(parents=True)
    run_id = db.record_start(folder, {"model": str(model), "task": "causal_lm", "method": {"name": "lora"}})
    db.record_end(run_id, "completed", metrics={})
    return run_id


def session_id(response) -> str:
    assert response.status_code in (200, 303), response.text[:2000]
    return re.search(r"/feedback/s/([0-9a-f]+)", response.headers.get("location") or str(response.url)).group(1)


def wait_state(client, sid: str, states=("ready", "done"), timeout: float = 120) -> str:
    """The session's part once its state is one of ``states``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        part = client.get(f"/feedback/s/{sid}/part").text
        state = re.search(r'data-state="(\w+)"', part).group(1)
        if state in states:
            return part
        assert state != "failed", part
        time.sleep(0.1)
    raise AssertionError(f"session {sid} still {state} after {timeout} s")
