"""The worker: one thread runs every model forward, so the event loop never waits for torch.

Each turn it (1) runs control work (attaching or dropping a delta) between forwards, (2) prefills
waiting generation requests that fit into their running batch (``max_batch`` rows; those that share a
batch key and a stackable cache in one forward), (3) runs one
dynamic batch of one-shot requests (classify, embed, score) once ``max_batch`` items of one batch key
are waiting or the oldest has waited ``batch_wait_ms``, and (4) advances every running generation
batch by one token. One worker, not one per base: with a few cores, two threads doing matrix work
only slow each other down, and one queue keeps the order of arrival across bases.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Future
from typing import Callable

import torch

from ..methods.feature_classifier import FeatureClassifier, pool
from ..tasks.classification import class_probabilities
from ..tasks.reward import response_scores
from ..tasks.token_classification import token_logits
from .generation import DecodeBatch, EncoderDecoderRun, PrefixCache, Sequence, mergeable, prefill, prefill_together
from .requests import Request
from .types import Overloaded, UnknownModel

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, max_batch: int = 16, batch_wait_ms: float = 5, queue_size: int = 256):
        self.max_batch, self.batch_wait, self.queue_size = max_batch, batch_wait_ms / 1000, queue_size
        self.cv = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.controls: deque[tuple[Callable, Future]] = deque()
        self.running: list[DecodeBatch | EncoderDecoderRun] = []
        self.closed = False  # draining: no new requests
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.batch_sizes: dict[str, Counter] = {}
        self.tokens_generated = 0
        self.prompt_tokens_reused = 0  # prompt positions whose keys and values came from the prefix cache
        self.prefixes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> PrefixCache

    # ------------------------------------------------------------------ from the event loop

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="deltatune-serve", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> None:
        member = request.member
        with self.cv:
            if member.closing:
                raise UnknownModel(member.served.name, [])
            if self.closed:
                raise Overloaded("the server is shutting down; retry on another instance")
            if len(self.waiting) >= self.queue_size:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (the queue holds {self.queue_size}); "
                                 "retry shortly")
            member.inflight += 1
            self.waiting.append(request)
            self.cv.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run ``fn`` in the worker between forwards (models change only there)."""
        future: Future = Future()
        with self.cv:
            if self.thread is None or not self.thread.is_alive():
                _run_into(future, fn)
                return future
            self.controls.append((fn, future))
            self.cv.notify_all()
        return future

    def wait(self, predicate: Callable[[], bool]) -> None:
        """Block until ``predicate()`` holds (checked under the lock whenever work finishes)."""
        with self.cv:
            self.cv.wait_for(predicate)

    def stop(self) -> None:
        with self.cv:
            self.closed = self.stopping = True
            self.cv.notify_all()
        if self.thread is not None:
            self.thread.join()

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        while True:
            with self.cv:
                while not (self.controls or self.running or self._ready() is not None or self._admissible()):
                    if self.stopping and not self.waiting:
                        return
                    self.cv.wait(timeout=self._until_ready())
                controls = list(self.controls)
                self.controls.clear()
            for fn, future in controls:
                _run_into(future, fn)
            try:
                with torch.no_grad():
                    self._admit()
                    self._one_shot()
                    self._decode()
            except Exception:  # noqa: BLE001 - a bug here must not stop the worker (requests fail one by one)
                log.exception("serve worker")

    def _pending(self) -> dict[tuple, list]:
        """Waiting one-shot requests by batch key, in order of arrival: [first arrival, items]."""
        out: dict[tuple, list] = {}
        for r in self.waiting:
            if r.op != "generate":
                out.setdefault(_one_shot_key(r), [r.arrived, 0])[1] += len(r.items)
        return out

    def _until_ready(self) -> float | None:
        pending = self._pending()
        if not pending:
            return None
        return max(0.0, min(first for first, _ in pending.values()) + self.batch_wait - time.monotonic())

    def _ready(self) -> tuple | None:
        """The batch key of one-shot requests to run now: ``max_batch`` items, or one waited ``batch_wait_ms``."""
        now = time.monotonic()
        for key, (first, items) in self._pending().items():
            if items >= self.max_batch or now - first >= self.batch_wait or self.stopping:
                return key
        return None

    def _admissible(self) -> bool:
        return any(r.op == "generate" and self._batch_for(r) is not False for r in self.waiting)

    def _batch_for(self, request: Request):
        """The running batch a generation request joins, None for a new one, False while ``max_batch`` sequences
        of its batch key are running."""
        group = request.member.group
        key = group.batch_key(request.member, decoding=True)
        same = [b for b in self.running if b.group is group and b.key == key]
        if sum(len(b) for b in same) >= self.max_batch:
            return False
        return next((b for b in same if isinstance(b, DecodeBatch) and not b.solo), None)

    def _take(self, chosen: Callable[[Request], bool], limit: int | None = None) -> list[Request]:
        with self.cv:
            out, rest, items = [], deque(), 0
            for r in self.waiting:
                if chosen(r) and (limit is None or not out or items + len(r.items) <= limit):
                    out.append(r)
                    items += len(r.items)
                else:
                    rest.append(r)
            self.waiting = rest
            return out

    def _done(self, request: Request) -> None:
        with self.cv:
            request.member.inflight -= 1
            self.cv.notify_all()

    def _count(self, op: str, size: int) -> None:
        with self.cv:  # stats() reads these from the event loop
            self.batch_sizes.setdefault(op, Counter())[size] += 1

    def stats(self) -> dict:
        with self.cv:
            return {"queue_depth": len(self.waiting), "running_sequences": sum(len(b) for b in self.running),
                    "batch_sizes": {op: dict(sorted(c.items())) for op, c in self.batch_sizes.items()},
                    "tokens_generated": self.tokens_generated, "prompt_tokens_reused": self.prompt_tokens_reused}

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        for r in requests:
            r.resolve(error=exc)
            self._done(r)

    # ------------------------------------------------------------------ one-shot batches

    def _one_shot(self) -> None:
        with self.cv:
            key = self._ready()
        if key is None:
            return
        requests = self._take(lambda r: r.op != "generate" and _one_shot_key(r) == key, self.max_batch)
        try:
            results = ONE_SHOT[requests[0].op](self, requests)
        except Exception as exc:  # noqa: BLE001 - the callers get the error; the worker goes on
            self._fail(requests, exc)
            return
        for r, result in zip(requests, results):
            r.resolve(result)
            self._done(r)

    def _forward(self, op: str, requests: list[Request], rows: list[list[int]], fn: Callable) -> list:
        """``fn(model, ids)`` over every request's rows in batches of ``max_batch``, each row with its delta."""
        group = requests[0].member.group
        adapters = [r.member.adapter for r, ids in zip(requests, rows) for _ in ids]
        # A text that tokenizes to nothing ("" with a tokenizer that adds no [CLS]) reads one unknown token:
        # a forward over zero positions would fail, and an empty text is a valid input
        filler = [t for t in (group.tokenizer.unk_token_id, group.tokenizer.pad_token_id) if t is not None][:1]
        flat = [x if len(x) else filler for ids in rows for x in ids]
        out: list = [None] * len(flat)
        for chunk in length_batches([len(x) for x in flat], self.max_batch):
            self._count(op, len(chunk))
            with group.routed([adapters[i] for i in chunk]) as model:
                for i, value in zip(chunk, fn(model, [flat[i] for i in chunk])):
                    out[i] = value
        return _split(out, [len(ids) for ids in rows])

    def _classify(self, requests: list[Request]) -> list:
        task = requests[0].member.task
        pad = requests[0].member.group.tokenizer
        if task.head == "token":
            encoded = [task.word_ids(r.member.tokenizer, r.items) for r in requests]
            logits = self._forward("classify", requests, [[ids for ids, _ in e] for e in encoded],
                                   lambda model, ids: token_logits(model, pad, ids))
            return [[r.member.task.tagged(text, words, rows) for text, (_, words), rows in zip(r.items, e, out)]
                    for r, e, out in zip(requests, encoded, logits)]
        rows = [r.member.task.text_ids(r.member.tokenizer, r.items) for r in requests]
        probs = self._forward("classify", requests, rows, lambda model, ids: class_probabilities(model, pad, ids))
        return [r.member.task.labelled(r.items, torch.stack(p)) for r, p in zip(requests, probs)]

    def _embed(self, requests: list[Request]) -> list:
        group = requests[0].member.group
        rows = [r.member.tokenizer(r.items, truncation=r.member.max_length is not None,
                                   max_length=r.member.max_length)["input_ids"] for r in requests]

        def vectors(model, ids):
            enc = group.tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            device = next(model.parameters()).device
            input_ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            if isinstance(group.model, FeatureClassifier):  # pooled as its head reads them
                return group.model.encode(input_ids, mask).float().cpu()
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            return pool(hidden[:, -input_ids.shape[1]:], mask).float().cpu()  # a soft prompt's tokens left out

        out = self._forward("embed", requests, rows, vectors)
        return [[v.tolist() for v in vs] for vs in out]

    def _score(self, requests: list[Request]) -> list:
        pad_id = requests[0].member.group.tokenizer.pad_token_id
        rows = [r.member.task.pair_ids(r.member.tokenizer, [p for p, _ in r.items], [a for _, a in r.items])
                for r in requests]
        return self._forward("score", requests, rows, lambda model, ids: response_scores(model, pad_id, ids))

    # ------------------------------------------------------------------ generation

    def _admit(self) -> None:
        while True:
            with self.cv:
                request = next((r for r in self.waiting if r.op == "generate" and self._batch_for(r) is not False),
                               None)
                if request is None:
                    return
                self.waiting.remove(request)
                batch = self._batch_for(request)
                company = self._company(request, batch)  # more new requests that can prefill with it
            if request.cancelled:
                self._done(request)
                self._requeue(company)
                continue
            if company or self._stackable(request, batch):
                self._start_together([request, *company], batch)
                continue
            try:
                self._start(request, batch)
            except Exception as exc:  # noqa: BLE001
                self._fail([request], exc)

    @staticmethod
    def _stackable(request: Request, batch) -> bool:
        """A decoder-only model whose cache rows stack (no soft prompt): prefilled by ``prefill_together``."""
        group = request.member.group
        return not (group.encoder_decoder or group.prompt_learning or (batch is not None and batch.solo))

    def _company(self, request: Request, batch) -> list[Request]:
        """Waiting generation requests that prefill in one forward with ``request`` and join its batch: same
        group and batch key, a decoder-only model whose cache rows stack (no soft prompt), room left."""
        group = request.member.group
        if not self._stackable(request, batch):
            return []
        key = group.batch_key(request.member, decoding=True)
        room = self.max_batch - 1 - sum(len(b) for b in self.running if b.group is group and b.key == key)
        company = [r for r in self.waiting if r.op == "generate" and r.member.group is group and not r.cancelled
                   and group.batch_key(r.member, decoding=True) == key][:max(room, 0)]
        for r in company:
            self.waiting.remove(r)
        return company

    def _requeue(self, requests: list[Request]) -> None:
        with self.cv:
            self.waiting.extendleft(reversed(requests))

    def _start_together(self, requests: list[Request], batch: DecodeBatch | None) -> None:
        group = requests[0].member.group
        sequences = [Sequence(r, r.member.tokenizer, eos_ids(group.model, r.member.tokenizer), position_limit(group.model))
                     for r in requests]
        prompts = [r.items for r in requests]
        try:
            head = self._head(group, [r.member.adapter for r in requests], prompts)
            with group.routed([r.member.adapter for r in requests]) as model:
                device = next(model.parameters()).device
                cache, mask, chunks = prefill_together(model, sequences, prompts, device, head)
        except Exception as exc:  # noqa: BLE001
            self._fail(requests, exc)
            return
        self._count("prefill", len(requests))
        for sequence, chunk in zip(sequences, chunks):
            self._deliver(sequence, chunk)
        if batch is None or not mergeable(cache):  # a cache that cannot stack with others' runs as its own batch
            batch = DecodeBatch(group, group.batch_key(requests[0].member, decoding=True))
            self.running.append(batch)
        batch.join_rows(sequences, cache, mask)
        batch.keep(lambda s: s.finish is None)

    def _head(self, group, adapters: list[str | None], prompts: list[list[int]]):
        """The known prefix all ``prompts`` share, with its keys and values for each row's delta (computed
        on first use), or None."""
        prefixes = self.prefixes.setdefault(group, PrefixCache())
        for prompt in prompts:
            prefixes.learn(prompt)
        prefix = prefixes.shared(prompts)
        if prefix is None:
            return None
        per_delta = {}
        for adapter in dict.fromkeys(adapters):
            with group.routed([adapter]) as model:
                per_delta[adapter] = prefixes.cached(model, adapter, prefix, next(model.parameters()).device)
            if per_delta[adapter] is None:
                return None
        self.prompt_tokens_reused += len(prefix) * len(prompts)
        return len(prefix), [per_delta[a] for a in adapters]

    def _start(self, request: Request, batch: DecodeBatch | None) -> None:
        member = request.member
        group = member.group
        sequence = Sequence(request, member.tokenizer, eos_ids(group.model, member.tokenizer),
                            position_limit(group.model))
        if group.encoder_decoder:
            start = group.model.config.decoder_start_token_id
            key = group.batch_key(member, decoding=True)
            self.running.append(EncoderDecoderRun(group, key, sequence, request.items, start))
            return
        with group.routed([member.adapter]) as model:
            device = next(model.parameters()).device
            item, chunk = prefill(model, sequence, request.items, device)
        self._count("prefill", 1)
        self._deliver(sequence, chunk)
        if sequence.finish is None:
            if batch is None or not batch.takes(item):
                batch = DecodeBatch(group, group.batch_key(member, decoding=True))
                self.running.append(batch)
            batch.join(item)

    def _decode(self) -> None:
        for batch in list(self.running):
            batch.keep(self._still_wanted)
            if len(batch):
                try:
                    adapters = [s.request.member.adapter for s in batch.rows]
                    context = batch.group.routed(adapters) if isinstance(batch, EncoderDecoderRun) \
                        else batch.group.decoder(adapters)
                    with context as model:
                        chunks = batch.step(model)
                except Exception as exc:  # noqa: BLE001
                    self._fail([s.request for s in batch.rows], exc)
                    batch.rows.clear()
                else:
                    self._count("generate", len(batch))
                    for sequence, chunk in zip(batch.rows, chunks):
                        self._deliver(sequence, chunk)
                    batch.keep(lambda s: s.finish is None)
            if not len(batch):
                self.running.remove(batch)

    def _still_wanted(self, sequence: Sequence) -> bool:
        if sequence.request.cancelled:
            self._done(sequence.request)
            return False
        return True

    def _deliver(self, sequence: Sequence, chunk) -> None:
        self.tokens_generated += 1
        if chunk is not None:
            sequence.request.send(chunk)
        if sequence.finish is not None:
            self._done(sequence.request)


ONE_SHOT = {"classify": Scheduler._classify, "embed": Scheduler._embed, "score": Scheduler._score}


def _one_shot_key(request: Request) -> tuple:
    group = request.member.group
    return id(group), group.batch_key(request.member), request.op


FORWARD_COST = 36  # a forward's fixed cost in positions: MiniLM on 2 CPU cores, ~5 ms + 0.14 ms per position


def length_batches(lengths: list[int], max_batch: int, forward_cost: int = FORWARD_COST) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``max_batch`` that cost the least: each batch pads its
    rows to its longest, and each forward costs ``forward_cost`` positions more. Rows sorted by length,
    then cut where padding would cost more than another forward (dynamic programming over the cuts)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best, cut = [0.0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        best[end], cut[end] = min((best[start] + forward_cost + (end - start) * longest, start)
                                  for start in range(max(0, end - max_batch), end))
    batches, end = [], len(order)
    while end:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def _split(values: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start:start + n])
        start += n
    return out


def _run_into(future: Future, fn: Callable) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
        future.set_exception(exc)


def eos_ids(model, tokenizer) -> set[int]:
    """The tokens that end generation: the model's generation config, else the tokenizer's end token."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def position_limit(model) -> int | None:
    """The largest position a decoder with learned positions can read (None: no limit known)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
