"""Step-level batched decoding: sequences decode one token per step together, with one KV cache.

New sequences are prefilled together (``prefill_together``: left-padded, the padding masked, each row's
positions from 0; one alone: ``prefill``), then join the running batch at the next step. The batch's cache is right-aligned:
row i holds its ``L_i`` cached positions in the last ``L_i`` columns, left padding before them masked
out by the attention mask, and each row reads its own position ids, so a row computes what it would
alone (up to the last bits of fp32 arithmetic: a matrix product over more rows may round differently).
A finished sequence leaves at once; columns that no remaining row uses are cut off.

Encoder-decoder models decode each sequence on its own (their decoders' relative positions come from
the cache length, which left padding would shift).
"""

from __future__ import annotations

import functools
import inspect
import random
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .types import Chunk, Sampling


MIN_TEMPERATURE = 1e-4  # below it, greedy: dividing fp32 logits by less can overflow (or the scalar round to 0)


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row of logits: the argmax, or a sample at ``temperature`` from the smallest
    set of tokens whose probability reaches ``top_p``."""
    if sampling.temperature < MIN_TEMPERATURE or generator is None:
        return int(logits.argmax())
    logits = logits.float()
    # minus the maximum first: a tiny temperature then gives -inf (probability 0), never inf - inf = nan
    probs = torch.softmax((logits - logits.max()) / sampling.temperature, -1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # up to and including the crossing token
        keep[0] = True  # top_p 0 (or below the first token's share): the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class TextStream:
    """Generated tokens -> text deltas. Text is released only when it decodes cleanly (a multi-byte
    character split over tokens waits for its last byte) and cannot be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text released so far
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(new text, whether a stop string ended it)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest of it
            return "", False
        self.text = text
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0),
                  default=-1)
        if cut >= 0:
            return self._release(cut), True
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._release(max(self.sent, len(text) - held)), False

    def flush(self) -> str:
        """What was held back (the start of a stop string that did not come)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


class Sequence:
    """One generation request while it decodes."""

    def __init__(self, request, tokenizer, eos: set[int], limit: int | None):
        self.request = request
        self.sampling: Sampling = request.sampling
        self.generator = None
        if self.sampling.temperature > 0:
            seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self.stream = TextStream(tokenizer, self.sampling.stop)
        self.eos, self.limit = eos, limit  # limit: the model's largest position
        self.generated: list[int] = []
        self.pending: list[int] = []  # token ids not yet sent in a chunk
        self.next_token = 0  # chosen, not yet in the cache
        self.position = 0  # where next_token goes
        self.finish: str | None = None

    def accept(self, logits: torch.Tensor) -> Chunk | None:
        """Choose the next token from its logits; the chunk to send, if any."""
        token = choose(logits, self.sampling, self.generator)
        self.generated.append(token)
        self.pending.append(token)
        self.next_token = token
        text, stopped = ("", False) if token in self.eos else self.stream.push(token)
        if token in self.eos or stopped:
            self.finish = "stop"
        elif len(self.generated) >= self.sampling.max_tokens or (self.limit and self.position >= self.limit):
            self.finish = "length"
        if self.finish and not stopped:
            text += self.stream.flush()
        if not text and not self.finish:
            return None
        chunk, self.pending = Chunk(text, self.pending, self.finish), []
        return chunk


@dataclass
class Prefilled:
    sequence: Sequence
    cache: DynamicCache
    length: int  # cached positions (a soft prompt's virtual tokens included)
    device: torch.device


@torch.no_grad()
def prefill(model, sequence: Sequence, prompt_ids: list[int], device) -> tuple[Prefilled, Chunk | None]:
    """The prompt through the model alone; the first token chosen."""
    ids = torch.tensor([prompt_ids], device=device)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **last_logits_only(model))
    cache = out.past_key_values
    length = cache.get_seq_length()
    sequence.position = length
    return Prefilled(sequence, cache, length, device), sequence.accept(out.logits[0, -1].float().cpu())


@torch.no_grad()
def prefill_together(model, sequences: list[Sequence], prompts: list[list[int]], device,
                     head: tuple[int, list[list[tuple]]] | None = None) -> tuple[DynamicCache, torch.Tensor, list]:
    """Several prompts through the model in one forward, left-padded (the padding masked, each row's
    positions from 0): the cache and mask in ``DecodeBatch``'s layout, and each row's first chunk. Each
    row computes what it would alone, up to the last bits of fp32 (a matrix product over more rows).

    ``head``: (P, one cached prefix per row) when every prompt starts with the same P tokens whose keys and
    values are known (``PrefixCache``): only the rest of each prompt goes through the model, after the
    prefix, and the padding sits between the two (masked, as the left padding is)."""
    start = head[0] if head else 0
    rest = [p[start:] for p in prompts]
    width = max(len(p) for p in rest)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in rest], device=device)
    mask = torch.tensor([[1] * start + [0] * (width - len(p)) + [1] * len(p) for p in rest], device=device)
    positions = (mask[:, start:].cumsum(1) - 1).clamp(min=0) + start
    past = None
    if head:
        layers = zip(*head[1])  # per layer: every row's (keys, values)
        past = DynamicCache(ddp_cache_data=[(torch.cat([k for k, _ in rows]), torch.cat([v for _, v in rows]))
                                            for rows in layers])
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True,
                **last_logits_only(model))
    logits = out.logits[:, -1].float().cpu()
    chunks = []
    for row, (sequence, prompt) in enumerate(zip(sequences, prompts)):
        sequence.position = len(prompt)
        chunks.append(sequence.accept(logits[row]))
    return out.past_key_values, mask, chunks


class PrefixCache:
    """Keys and values of prompt beginnings that many requests share (a chat template's system prompt, an
    application's own instructions), per delta, so that a prefill computes them once.

    Prefixes are learned, not configured: the longest common beginning of a prompt and the one before it,
    once it is ``min_length`` tokens or more. A prompt reuses the longest known prefix it starts with (one
    token at least left over); the keys and values are computed on first use for each delta. Both lists
    are bounded (least recently used out). Correct whatever was learned: a causal model's keys and values
    for a token depend only on the tokens before it, and a prefix matches token for token."""

    def __init__(self, min_length: int = 16, prefixes: int = 8, entries: int = 32):
        self.min_length, self.max_prefixes, self.max_entries = min_length, prefixes, entries
        self.prefixes: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self.entries: OrderedDict[tuple, list[tuple]] = OrderedDict()  # (adapter, prefix) -> per layer (k, v)
        self.last: list[int] = []

    def learn(self, prompt: list[int]) -> None:
        common = _common_length(prompt, self.last)
        self.last = prompt
        if common >= self.min_length:
            prefix = tuple(prompt[:common])
            self.prefixes[prefix] = None
            self.prefixes.move_to_end(prefix)
            while len(self.prefixes) > self.max_prefixes:
                self.prefixes.popitem(last=False)

    def shared(self, prompts: list[list[int]]) -> tuple[int, ...] | None:
        """The longest known prefix every prompt starts with and goes beyond."""
        shortest = min(len(p) for p in prompts)
        fits = [q for q in self.prefixes if len(q) < shortest and all(tuple(p[:len(q)]) == q for p in prompts)]
        return max(fits, key=len, default=None)

    def cached(self, model, adapter, prefix: tuple[int, ...], device) -> list[tuple] | None:
        """The prefix's keys and values under ``adapter`` (``model`` computes them with that delta), or
        None when its cache is not plain per-layer tensors."""
        key = (adapter, prefix)
        if key not in self.entries:
            ids = torch.tensor([prefix], device=device)
            cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                          **last_logits_only(model)).past_key_values
            if not mergeable(cache):
                return None
            self.entries[key] = [(layer.keys, layer.values) for layer in cache.layers]
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        self.prefixes.move_to_end(prefix)
        return self.entries[key]


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def last_logits_only(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: a prefill needs the last position's logits only (the
    output layer over every prompt position is a large share of a small model's prefill)."""
    inner = getattr(model, "model", model)  # Routed -> PeftModel
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(base)) else {}


@functools.cache
def _takes_logits_to_keep(cls) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


class DecodeBatch:
    """Sequences decoding together on one cache (one group, one batch key)."""

    def __init__(self, group, key):
        self.group, self.key = group, key
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns) 1 where a row has a cached position
        self.solo = False  # a cache that cannot be merged (e.g. sliding-window layers): one sequence only

    def __len__(self) -> int:
        return len(self.rows)

    def takes(self, item: Prefilled) -> bool:
        return not self.rows or (not self.solo and mergeable(item.cache))

    def join(self, item: Prefilled) -> None:
        self.join_rows([item.sequence], item.cache, torch.ones(1, item.length, dtype=torch.long, device=item.device))

    def join_rows(self, sequences: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Rows whose cache (right-aligned, ``mask`` 1 at their positions) joins the batch's."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(sequences), cache, mask
            self.solo = not mergeable(cache)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for layer, new in zip(self.cache.layers, cache.layers):
            layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(new.keys, width)])
            layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(new.values, width)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.rows += sequences

    @torch.no_grad()
    def step(self, model) -> list[Chunk | None]:
        """One token for every row; the chunks to send (rows that finish are then dropped by ``keep``)."""
        device = self.mask.device
        ids = torch.tensor([[s.next_token] for s in self.rows], device=device)
        positions = torch.tensor([[s.position] for s in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=device)], 1)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                    use_cache=True)
        logits = out.logits[:, -1].float().cpu()
        chunks = []
        for row, sequence in enumerate(self.rows):
            sequence.position += 1
            chunks.append(sequence.accept(logits[row]))
        return chunks

    def keep(self, wanted) -> None:
        """Keep only the rows for which ``wanted(sequence)``; cut columns no row uses any more."""
        rows = [i for i, s in enumerate(self.rows) if wanted(s)]
        if len(rows) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in rows]
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).nonzero()[0])
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]



def mergeable(cache) -> bool:
    """Rows of this cache can be stacked with others': plain per-layer key/value tensors."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (rows, [heads,] columns[, dim]) with zero columns before it up to ``width`` columns."""
    extra = width - (t.shape[1] if t.dim() == 2 else t.shape[2])
    if extra == 0:
        return t
    return F.pad(t, (extra, 0)) if t.dim() == 2 else F.pad(t, (0, 0, extra, 0))


class EncoderDecoderRun:
    """One sequence of an encoder-decoder model, decoded on its own."""

    def __init__(self, group, key, sequence: Sequence, source: list[int], start_token: int):
        self.group, self.key = group, key
        self.rows = [sequence]
        self.source = source
        self.start_token = start_token
        self.cache = None
        self.encoded = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def step(self, model) -> list[Chunk | None]:
        (sequence,) = self.rows
        device = next(model.parameters()).device
        source = torch.tensor([self.source], device=device)
        decoder_ids = torch.tensor([[self.start_token if self.cache is None else sequence.next_token]], device=device)
        out = model(input_ids=None if self.encoded else source, attention_mask=torch.ones_like(source),
                    encoder_outputs=self.encoded, decoder_input_ids=decoder_ids, past_key_values=self.cache,
                    use_cache=True)
        if self.encoded is None:
            self.encoded = (out.encoder_last_hidden_state,)
        self.cache = out.past_key_values
        sequence.position += 1
        return [sequence.accept(out.logits[0, -1].float().cpu())]

    def keep(self, wanted) -> None:
        self.rows = [s for s in self.rows if wanted(s)]
