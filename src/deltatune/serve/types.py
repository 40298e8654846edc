"""What the engine and the HTTP layer share: the errors the engine raises, what it serves, how it samples.

Neither side owns these alone: ``engine.py`` raises and returns them, ``app.py`` turns them into HTTP
(``UnknownModel`` 404, ``WrongKind`` 400, ``TooLong`` 400, ``Overloaded`` 503 with Retry-After).
``EngineLike`` is the engine's interface as the HTTP layer uses it, so app/auth/config never import
``engine.py`` (an import-linter contract) and are tested with a fake engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypedDict

from ..errors import DeltatuneError

# What a served name can do; each endpoint accepts some of them (app.py).
KINDS = ("generate", "classify", "tag", "embed", "score")


class UnknownModel(DeltatuneError):
    """No model of that name is served (HTTP 404, listing the names that are)."""

    def __init__(self, name: str, available: list[str], message: str | None = None):
        self.name = name
        self.available = list(available)
        super().__init__(message or f"model {name!r} is not served; available: {', '.join(self.available) or 'none'}")


class WrongKind(DeltatuneError):
    """The model cannot do what was asked, e.g. classify with a decoder (HTTP 400)."""


class Overloaded(DeltatuneError):
    """The bounded queue is full, or the engine is draining (HTTP 503 with Retry-After)."""

    retry_after: float = 1.0


class TooLong(DeltatuneError):
    """A prompt or input is over the token limit (HTTP 400)."""


@dataclass
class Served:
    """One name the engine answers to (``GET /v1/models`` lists them)."""
    name: str
    kind: str                 # one of KINDS
    task: str                 # the run's task (causal_lm, classification, ...)
    method: str | None        # the run's method (lora, ia3, ...); None for a base
    run: str | None           # the run directory; None for a base. Never sent to clients.
    base: str                 # the base model it sits on
    labels: list[str] | None  # class or tag names (classify, tag); None otherwise


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Chunk:
    """A piece of a generation: the new text and the token ids it came from."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # None until the last chunk: "stop" (end of sequence or a stop string) or "length"


class EngineStats(TypedDict, total=False):
    """What ``Engine.stats()`` returns, as /metrics reads it (every key optional; metrics.py also takes other
    numbers, {name: number} and {name: {count: number}}, and leaves out what it does not understand)."""
    queue_depth: int                          # requests waiting now
    running_sequences: int                    # generations in the running batches now
    batch_sizes: dict[str, dict[int, int]]    # operation -> batch size -> batches run (or just size -> batches)
    tokens_generated: int                     # since start
    prompt_tokens_reused: int                 # prompt positions taken from the shared-prefix cache, since start
    requests: dict[str, int]                  # served name -> requests since start


class EngineLike(Protocol):
    """The engine's interface as the HTTP layer calls it (engine.Engine implements it)."""

    async def start(self) -> None: ...
    async def drain(self) -> None: ...
    def served(self) -> list[Served]: ...
    def get(self, name: str) -> Served: ...
    async def load(self, name: str, run_dir: str | Path) -> Served: ...
    async def unload(self, name: str) -> None: ...
    def chat_prompt(self, name: str, messages: list[dict]) -> list[int]: ...
    def text_prompt(self, name: str, prompt: str) -> list[int]: ...
    def generate(self, name: str, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[Chunk]: ...
    async def classify(self, name: str, texts: list[str]) -> list[dict]: ...
    async def embed(self, name: str, texts: list[str]) -> list[list[float]]: ...
    async def score(self, name: str, prompts: list[str], responses: list[str]) -> list[float]: ...
    def stats(self) -> dict: ...
    def count_tokens(self, name: str, text: str) -> int: ...
