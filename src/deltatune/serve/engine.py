"""The serving engine: finished runs loaded by name, requests answered in batches.

``Engine(runs)`` maps served names to run directories. ``start()`` loads them, a base model once for
all the runs whose deltas it can hold (``loading``), and starts the worker thread (``batching``) that
runs every forward; the coroutines here only queue requests and await their answers, so the event
loop never waits for torch. Each distinct base model is served too: as ``base`` when the runs share one,
else as ``base:<model folder name>``.

Answers equal ``deltatune predict`` / ``inference.score`` on the same run: the tasks' own encoding and
formatting (``Classification.text_ids`` / ``labelled``, ``TokenClassification.word_ids`` / ``tagged``,
``Reward.pair_ids``) around one batched forward; greedy generation gives the tokens ``predict`` gives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from ..assets import MODELS
from ..data.examples import conversation_ids
from ..errors import ArgumentError, DeltatuneError
from ..inference import RunParts
from .batching import Scheduler
from .loading import (Group, Member, base_folder, base_member, group_key, load_group, load_plain_base,
                      member_for, read_parts)
from .requests import Request
from .types import Chunk, Overloaded, Sampling, Served, TooLong, UnknownModel, WrongKind

__all__ = ["Engine", "Served", "Sampling", "Chunk", "UnknownModel", "WrongKind", "Overloaded", "TooLong"]

WHAT = {"generate": "generate text", "classify": "classify texts", "embed": "embed texts (an encoder's)",
        "score": "score responses (a reward model's)"}


class Engine:
    def __init__(self, runs: dict[str, str | Path], *, max_batch: int = 16, batch_wait_ms: float = 5,
                 queue_size: int = 256, max_prompt_tokens: int = 2048, threads: int | None = None):
        """``threads``: torch's intra-op threads for the worker (default: torch's own choice)."""
        self._runs = dict(runs)
        self.max_prompt_tokens, self.threads = max_prompt_tokens, threads
        self.scheduler = Scheduler(max_batch, batch_wait_ms, queue_size)
        self._members: dict[str, Member] = {}
        self._groups: dict[tuple, Group] = {}  # groups that take more deltas, by group key
        self._bases: dict[Path, str] = {}  # base model folder -> its served name
        self._requests: dict[str, int] = {}
        self._lock: asyncio.Lock | None = None  # one load at a time

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Load every run (and each base), then start the worker."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        parts = {name: await asyncio.to_thread(read_parts, path) for name, path in self._runs.items()}
        folders = list(dict.fromkeys(base_folder(p) for p in parts.values()))
        for folder in folders:
            first = next(p for p in parts.values() if base_folder(p) == folder)
            self._bases[folder] = "base" if len(folders) == 1 else self._base_name(folder, first)
        for name, p in parts.items():
            await self._add(name, p)
        for folder in folders:
            await self._serve_base(folder, next(p for p in parts.values() if base_folder(p) == folder))
        self.scheduler.start()

    async def drain(self) -> None:
        """Refuse new requests (Overloaded), finish the queued and running ones, stop the worker."""
        with self.scheduler.cv:
            self.scheduler.closed = True
        await asyncio.to_thread(self.scheduler.stop)

    # ------------------------------------------------------------------ what is served

    def served(self) -> list[Served]:
        members = [m for m in self._members.values() if not m.closing]
        return [m.served for m in sorted(members, key=lambda m: m.served.run is not None)]

    def get(self, name: str) -> Served:
        return self._member(name).served

    async def load(self, name: str, run_dir: str | Path) -> Served:
        """Serve one more run, while requests to the others go on."""
        async with self._load_lock():
            if name in self._members:
                raise DeltatuneError(f"{name!r} is served already; unload it first or choose another name")
            parts = await asyncio.to_thread(read_parts, run_dir)
            folder = base_folder(parts)
            if folder not in self._bases:
                self._bases[folder] = "base" if not self._bases else self._base_name(folder, parts)
                await self._add(name, parts)
                await self._serve_base(folder, parts)
            else:
                await self._add(name, parts)
            return self._members[name].served

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests to it are refused at once, its queued and running ones finish
        first; other names are not disturbed."""
        member = self._member(name)
        with self.scheduler.cv:
            member.closing = True
        await asyncio.to_thread(self.scheduler.wait, lambda: member.inflight == 0)
        group = member.group
        await asyncio.wrap_future(self.scheduler.call(lambda: group.detach(member)))
        del self._members[name]
        if not group.members:
            self._groups.pop(group.key, None)

    # ------------------------------------------------------------------ prompts and tokens

    def chat_prompt(self, name: str, messages: list[dict]) -> list[int]:
        """Token ids of a conversation (``role``/``content`` messages) framed as the run was trained: its chat
        template (data.chat_template) with the generation prompt."""
        member = self._member(name, "generate")
        if member.group.encoder_decoder:
            return self.text_prompt(name, "\n".join(m["content"] for m in messages))
        return self._check_length(name, conversation_ids(member.tokenizer, messages, member.chat_template))

    def text_prompt(self, name: str, prompt: str) -> list[int]:
        """Token ids of a raw prompt (completions): tokenized as training tokenizes plain text."""
        member = self._member(name, "generate")
        if member.group.encoder_decoder:  # the source text, truncated as in training (seq2seq predict)
            ids = member.tokenizer(prompt, truncation=member.max_length is not None,
                                   max_length=member.max_length)["input_ids"]
        else:
            ids = member.tokenizer(prompt)["input_ids"]
        if not ids:  # an empty (or all-space) prompt: generate from the start token, as generate() does
            start = member.tokenizer.bos_token_id if member.tokenizer.bos_token_id is not None \
                else member.tokenizer.eos_token_id
            ids = [start] if start is not None else ids
        return self._check_length(name, ids)

    def count_tokens(self, name: str, text: str) -> int:
        """Tokens of ``text`` for the named model's tokenizer (no special tokens added)."""
        return len(self._member(name).tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_length(self, name: str, ids: list[int]) -> list[int]:
        if len(ids) > self.max_prompt_tokens:
            raise TooLong(f"{name}: the prompt has {len(ids)} tokens; at most {self.max_prompt_tokens} are "
                          "accepted")
        return ids

    # ------------------------------------------------------------------ requests

    def generate(self, name: str, prompt_ids: list[int], sampling: Sampling) -> Stream:
        """Stream the answer to ``prompt_ids`` as ``Chunk`` s. Use ``async for chunk in engine.generate(...)``,
        or ``stream = await engine.generate(...)`` first to be refused (Overloaded) before streaming."""
        member = self._member(name, "generate")
        if member.group.encoder_decoder and member.group.prompt_learning:
            raise WrongKind(f"{name}: generation with a soft prompt on an encoder-decoder is not served; use "
                            "deltatune predict")
        vocab = member.group.vocab_size
        if not prompt_ids or (vocab and not all(0 <= i < vocab for i in prompt_ids)):
            raise ArgumentError(f"{name}: the prompt must be token ids from 0 to {vocab - 1 if vocab else '?'}, and "
                                "at least one")
        self._check_length(name, prompt_ids)
        if sampling.max_tokens < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ArgumentError(f"sampling: max_tokens must be at least 1, temperature at least 0 and top_p in "
                                f"(0, 1]; got {sampling.max_tokens}, {sampling.temperature}, {sampling.top_p}")
        return Stream(self, member, list(prompt_ids), sampling)

    async def classify(self, name: str, texts: list[str]) -> list[dict]:
        """Labels with probabilities (classification) or tags per word (token classification), as predict."""
        return await self._one_shot(name, "classify", list(texts))

    async def embed(self, name: str, texts: list[str]) -> list[list[float]]:
        """One vector per text: an encoder's last hidden states, pooled as feature extraction pools them."""
        return await self._one_shot(name, "embed", list(texts))

    async def score(self, name: str, prompts: list[str], responses: list[str]) -> list[float]:
        """A reward model's score of each (prompt, response), as inference.score."""
        if len(prompts) != len(responses):
            raise ArgumentError(f"score: {len(prompts)} prompts but {len(responses)} responses; give one response "
                                "per prompt")
        return await self._one_shot(name, "score", list(zip(prompts, responses)))

    async def _one_shot(self, name: str, op: str, items: list):
        member = self._member(name, op)
        if not items:
            return []
        loop = asyncio.get_running_loop()
        request = Request(member, op, items, loop, future=loop.create_future())
        self._submit(request)
        return await request.future

    def _submit(self, request: Request) -> None:
        self.scheduler.submit(request)
        name = request.member.served.name
        self._requests[name] = self._requests.get(name, 0) + 1

    def stats(self) -> dict:
        """For /metrics: queue depth, running sequences, batch sizes per operation ({size: batches}), tokens
        generated, requests per served name."""
        return {**self.scheduler.stats(), "requests": dict(self._requests)}

    # ------------------------------------------------------------------ internals

    def _member(self, name: str, op: str | None = None) -> Member:
        member = self._members.get(name)
        if member is None or member.closing:
            raise UnknownModel(name, [s.name for s in self.served()])
        if op is not None and not member.can(op):
            served = member.served
            raise WrongKind(f"{name} is a {served.task} model ({served.kind}); it cannot {WHAT[op]}")
        return member

    async def _add(self, name: str, parts: RunParts) -> None:
        """Load a run into its group (a new one if none holds its kind of base) and serve it by name."""
        key = group_key(parts)
        group = self._groups.get(key) if key is not None else None
        if group is not None:
            adapter = await asyncio.wrap_future(self.scheduler.call(lambda: group.attach(parts)))
        else:
            group, adapter = await asyncio.to_thread(load_group, parts)
            if key is not None:
                self._groups[key] = group
        member = member_for(parts, name, group, adapter, self._bases[base_folder(parts)])
        group.members.append(member)
        self._members[name] = member

    async def _serve_base(self, folder: Path, parts: RunParts) -> None:
        """Serve a base model by name: from a group holding deltas on it (a generating one first), else loaded
        plainly."""
        hosts = [g for g in self._groups.values() if g.folder == folder and g.members]
        hosts.sort(key=lambda g: g.head not in ("causal", "seq2seq"))
        group = hosts[0] if hosts else await asyncio.to_thread(load_plain_base, parts)
        member = base_member(group, self._bases[folder])
        group.members.append(member)
        self._members[member.served.name] = member

    def _base_name(self, folder: Path, parts: RunParts) -> str:
        """``base:<the model as the run's config names it>`` (a packaged alias such as minilm, else the folder)."""
        ref = str(parts.cfg.model)
        label = ref if ref in MODELS else folder.name
        name, n = f"base:{label}", 1
        while name in self._members or name in self._bases.values():
            n += 1
            name = f"base:{label}-{n}"
        return name

    def _load_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


class Stream:
    """A generation's chunks. Awaiting it submits the request (raising Overloaded then); iterating submits
    it on the first step if that has not happened. Closing it (``aclose``), or cancelling the task that
    reads it, ends the generation in the worker."""

    def __init__(self, engine: Engine, member: Member, prompt_ids: list[int], sampling: Sampling):
        self._engine, self._member, self._ids, self._sampling = engine, member, prompt_ids, sampling
        self._request: Request | None = None
        self._done = False

    def _submit(self) -> None:
        if self._request is None:
            request = Request(self._member, "generate", self._ids, asyncio.get_running_loop(),
                              chunks=asyncio.Queue(), sampling=self._sampling)
            self._engine._submit(request)
            self._request = request

    def __await__(self):
        async def submitted() -> Stream:
            self._submit()
            return self
        return submitted().__await__()

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        self._submit()
        try:
            item = await self._request.chunks.get()
        except asyncio.CancelledError:
            self._cancel()
            raise
        if item is None or isinstance(item, BaseException):
            self._done = True
            if item is None:
                raise StopAsyncIteration
            raise item
        self._done = item.finish_reason is not None
        return item

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if self._request is not None and not self._done:
            self._request.cancelled = True
        self._done = True

    def __del__(self):
        if self._request is not None and not self._done:
            self._request.cancelled = True
