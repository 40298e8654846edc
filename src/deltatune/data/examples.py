"""Tokenized examples: their types, the encoders that make them, splits and fingerprints.

Each task (``tasks/``) says which encoder its rows go through; the example types below are what
the encoders return and ``data.collate`` batches:

- ``LabelledText``: ``input_ids`` and ``label`` (an index into the saved label list);
- ``TokenTargets``: ``input_ids`` and per-token ``labels`` (-100 where no loss is taken): causal-LM
  SFT (the prompt masked, the tokenizer's chat template framing the pair when it has one), plain
  text, word tags, seq2seq targets; packed rows add ``position_ids``;
- ``Ranking`` (reward models): ``responses``, the token ids of prompt + each response, best first;
- ``Pair`` (DPO): ``chosen`` and ``rejected``, each a ``TokenTargets``, and once computed the
  reference log-probabilities ``reference``.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

from typing import Callable, NotRequired, TypedDict

from ..assets import resolve_data
from ..config import Config
from ..errors import DataError
from . import split
from .load import FILE, ROW
from .preferences import Preference, load_preferences, to_pairs

IGNORE = -100


class LabelledText(TypedDict):
    input_ids: list[int]
    label: int
    features: NotRequired[object]  # a pooled vector, when a method computed it once (feature extraction)


class TokenTargets(TypedDict):
    input_ids: list[int]
    labels: list[int]
    position_ids: NotRequired[list[int]]  # packed rows (data/pack.py)


class Ranking(TypedDict):
    responses: list[list[int]]


class Pair(TypedDict):
    chosen: TokenTargets
    rejected: TokenTargets
    reference: NotRequired[tuple[float, float]]


@dataclass
class Split:
    """One prepared split: raw rows (for messages and prediction) and tokenized examples."""
    rows: list[dict]
    examples: list[dict] = field(default_factory=list)


@dataclass
class PreparedData:
    train: Split
    eval: Split
    labels: list[str] | None  # classification: index -> label name
    fingerprint: str
    mode: str  # the rows' kind (Fields.kind): classification, tokens, seq2seq, sft, text, preferences
    test: Split = field(default_factory=lambda: Split([]))
    report: dict = field(default_factory=dict)
    rejects: list[dict] = field(default_factory=list)


def _values(row: dict, column: str) -> list[str]:
    value = row[column]
    return value if isinstance(value, list) else [value]  # tags are lists, labels single values


def label_list(train_rows: list[dict], eval_rows: list[dict], column: str, train_path: str) -> list[str]:
    labels = sorted({v for r in train_rows for v in _values(r, column)})
    if len(labels) < 2:
        found = labels[0] if labels else "none"
        raise DataError(f"{train_path}: column {column!r} has a single class ({found!r}) in the training "
                        "data; classification needs at least two classes")
    check_known_labels(eval_rows, column, labels)
    return labels


def check_known_labels(rows: list[dict], column: str, labels: list[str]) -> None:
    known = set(labels)
    for row in rows:
        for value in _values(row, column):
            if value not in known:
                raise DataError(f"{row['_file']}: row {row[ROW]}: label {value!r} is not one the model "
                                f"was trained on ({', '.join(labels)}); fix the label or add training "
                                "examples of it")


# ----------------------------------------------------------------------------- tokenization

def encode_classification(rows: list[dict], tokenizer, cfg: Config, labels: list[str]) -> list[LabelledText]:
    index = {name: i for i, name in enumerate(labels)}
    texts = [r[cfg.data.text_column] for r in rows]
    ids = tokenizer(texts, truncation=True, max_length=cfg.train.max_length)["input_ids"]
    return [{"input_ids": x, "label": index[r[cfg.data.label_column]]} for x, r in zip(ids, rows)]


def prompt_text(tokenizer, prompt: str, use_chat_template: bool) -> str:
    """The text the model sees before it answers (shared by training and predict)."""
    return conversation_text(tokenizer, [{"role": "user", "content": prompt}], use_chat_template)


def conversation_text(tokenizer, messages: list[dict], use_chat_template: bool) -> str:
    """The text before the model's next answer in a conversation (``role``/``content`` messages): the chat
    template with its generation prompt, or without one each message's content on a line."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(m["content"] + "\n" for m in messages)


def prompt_ids(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of ``prompt_text``: what training puts before a response and generation continues
    (a BOS token first when there is no chat template to hold the special tokens)."""
    return conversation_ids(tokenizer, [{"role": "user", "content": prompt}], use_chat_template)


def conversation_ids(tokenizer, messages: list[dict], use_chat_template: bool) -> list[int]:
    """Token ids of ``conversation_text``, framed as ``prompt_ids`` frames one prompt."""
    ids = tokenizer(conversation_text(tokenizer, messages, use_chat_template), add_special_tokens=False)["input_ids"]
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)
    return ids if chat or tokenizer.bos_token_id is None else [tokenizer.bos_token_id] + ids


def _response_text(tokenizer, prompt: str, response: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        head = prompt_text(tokenizer, prompt, True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return full[len(head):]
    return response + (tokenizer.eos_token or "")


def sft_example(tokenizer, prompt: str, response: str, use_chat_template: bool, max_len: int) -> TokenTargets | None:
    """``input_ids`` of prompt + response and ``labels`` = the response tokens (-100 on the prompt);
    None when truncation to ``max_len`` leaves no response token."""
    head = prompt_ids(tokenizer, prompt, use_chat_template)
    tail = tokenizer(_response_text(tokenizer, prompt, response, use_chat_template),
                     add_special_tokens=False)["input_ids"]
    labels = ([IGNORE] * len(head) + tail)[:max_len]
    if all(x == IGNORE for x in labels):
        return None
    return {"input_ids": (head + tail)[:max_len], "labels": labels}


def _note_truncated(dropped: int, max_len: int, what: str = "example(s)") -> None:
    if dropped:
        print(f"note: {dropped} {what} had no response tokens left after truncating to "
              f"train.max_length={max_len} and were skipped", file=sys.stderr)


def encode_sft(rows: list[dict], tokenizer, cfg: Config) -> list[TokenTargets]:
    d, max_len = cfg.data, cfg.train.max_length
    encoded = [sft_example(tokenizer, row[d.prompt_column], row[d.response_column], d.chat_template, max_len)
               for row in rows]
    _note_truncated(sum(e is None for e in encoded), max_len)
    return [e for e in encoded if e is not None]


def encode_text(rows: list[dict], tokenizer, cfg: Config) -> list[TokenTargets]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for row in rows:
        ids = (tokenizer(row[cfg.data.text_column])["input_ids"] + eos)[: cfg.train.max_length]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def encode_tagged(rows: list[dict], tokenizer, cfg: Config, labels: list[str]) -> list[TokenTargets]:
    """Word-level tags onto sub-word tokens: each word's first token carries its tag, the rest -100."""
    index = {name: i for i, name in enumerate(labels)}
    d = cfg.data
    enc = tokenizer([r[d.tokens_column] for r in rows], is_split_into_words=True, truncation=True,
                    max_length=cfg.train.max_length)
    out = []
    for i, row in enumerate(rows):
        tags, previous, targets = row[d.tags_column], None, []
        for word in enc.word_ids(i):
            targets.append(IGNORE if word is None or word == previous else index[tags[word]])
            previous = word
        out.append({"input_ids": enc["input_ids"][i], "labels": targets})
    return out


def encode_seq2seq(rows: list[dict], tokenizer, cfg: Config) -> list[TokenTargets]:
    d, max_len = cfg.data, cfg.train.max_length
    sources = tokenizer([r[d.prompt_column] for r in rows], truncation=True, max_length=max_len)["input_ids"]
    targets = tokenizer(text_target=[r[d.response_column] for r in rows], truncation=True,
                        max_length=max_len)["input_ids"]
    return [{"input_ids": s, "labels": t} for s, t in zip(sources, targets)]


# ----------------------------------------------------------------------------- preferences (reward, dpo)

def reward_text(tokenizer, prompt: str, response: str, use_chat_template: bool) -> str:
    """What a reward model reads: the chat as the tokenizer's template writes it, else prompt, newline, response."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
    return prompt + "\n" + response


def reward_ids(tokenizer, prompts: list[str], responses: list[str], use_chat_template: bool,
               max_len: int) -> list[list[int]]:
    """Token ids of each (prompt, response) for a reward model. A text longer than ``max_len``
    loses the start of its prompt, never the end of the response: that is what is judged, and
    where a decoder reads its score."""
    chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
    texts = [reward_text(tokenizer, p, r, use_chat_template) for p, r in zip(prompts, responses)]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:  # the template already holds the special tokens
        return tokenizer(texts, truncation=True, max_length=max_len, add_special_tokens=not chat)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def encode_rankings(prefs: list[Preference], tokenizer, cfg: Config) -> list[Ranking]:
    """Each preference's responses (best first), read as a reward model reads them."""
    ids = reward_ids(tokenizer, [p.prompt for p in prefs for _ in p.responses],
                     [r for p in prefs for r in p.responses], cfg.data.chat_template, cfg.train.max_length)
    out, start = [], 0
    for p in prefs:
        out.append(Ranking(responses=ids[start:start + len(p.responses)]))
        start += len(p.responses)
    return out


def encode_pairs(prefs: list[Preference], tokenizer, cfg: Config) -> list[Pair]:
    """Every (chosen, rejected) pair the preferences imply, each side an SFT example."""
    d, max_len = cfg.data, cfg.train.max_length
    out, dropped = [], 0
    for prompt, chosen, rejected in to_pairs(prefs):
        sides = [sft_example(tokenizer, prompt, r, d.chat_template, max_len) for r in (chosen, rejected)]
        if None in sides:
            dropped += 1
            continue
        out.append(Pair(chosen=sides[0], rejected=sides[1]))
    _note_truncated(dropped, max_len, "pair(s)")
    return out


def split_by_prompt(prefs: list[Preference], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded share of the distinct prompts is held out with all their
    preferences, so no prompt is compared in training and scored in evaluation."""
    prompts = list(dict.fromkeys(p.prompt for p in prefs))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:round(len(prompts) * fraction)])
    return [p for p in prefs if p.prompt not in held], [p for p in prefs if p.prompt in held]


def prepare_preferences(cfg: Config, encode: Callable[[list[Preference]], list]) -> PreparedData:
    """Preference files -> split by prompt -> limits -> examples (``encode``, the task's), with a data report."""
    d = cfg.data
    files = {s: str(resolve_data(ref)) for s, ref in (("train", d.train), ("eval", d.eval)) if ref}
    rejects: list[dict] = []
    loaded = {s: load_preferences(path, d.on_error, rejects) for s, path in files.items()}
    splits, limited = split_and_limit(loaded, files["train"], cfg, "preferences")
    rows = {name: [{"prompt": p.prompt, "responses": p.responses, FILE: p.source[0], ROW: p.source[1]} for p in prefs]
            for name, prefs in splits.items()}
    report = _preference_report(cfg, files, rows, rejects, limited)
    return encoded(cfg, encode, splits, rows, report, rejects, "preferences", f"{files['train']}: no usable preference")


def encoded(cfg: Config, encode: Callable[[list], list], splits: dict[str, list], rows: dict[str, list[dict]],
            report: dict, rejects: list[dict], mode: str, none_left: str) -> PreparedData:
    """The prepared data of prompt-keyed items (preferences, thumbs rows): each split's items through ``encode``
    (the task's), next to their ``rows``. A DataError starting ``none_left`` where truncation left a split empty."""
    examples = {name: encode(items) for name, items in splits.items()}
    if not examples["train"] or not examples["eval"]:
        raise DataError(f"{none_left} examples after truncating to train.max_length={cfg.train.max_length}; raise it")
    return PreparedData(Split(rows["train"], examples["train"]), Split(rows["eval"], examples["eval"]), None,
                        report["fingerprint"], mode, report=report, rejects=rejects)


def split_and_limit(loaded: dict[str, list], train_file: str, cfg: Config, what: str) -> tuple[dict[str, list], int]:
    """Training and evaluation items of prompt-keyed data (preferences, thumbs rows): ``data.eval`` as given, or
    held out by prompt (a prompt's ``what`` stay together), then the row limits. Returns the splits and how
    many items the limits left out."""
    d, seed = cfg.data, cfg.train.seed
    if "eval" in loaded:
        splits = {"train": loaded["train"], "eval": loaded["eval"]}
    else:
        splits = dict(zip(("train", "eval"), split_by_prompt(loaded["train"], d.eval_fraction, seed)))
        if not splits["train"] or not splits["eval"]:
            prompts = len({item.prompt for item in loaded["train"]})
            raise DataError(f"{train_file}: {prompts} distinct prompt(s) cannot be split into training and "
                            f"evaluation prompts with data.eval_fraction={d.eval_fraction} (a prompt's {what} "
                            "stay together); add prompts, change data.eval_fraction or give data.eval")
    before = sum(len(v) for v in splits.values())
    for name, limit in (("train", d.train_limit), ("eval", d.eval_limit)):
        if limit:
            splits[name] = split.take(splits[name], limit, seed, None)
    return splits, before - sum(len(v) for v in splits.values())


def _preference_report(cfg: Config, files: dict, rows: dict, rejects: list[dict], limited: int) -> dict:
    """The data report's figures that apply to preference files (the cleaning steps do not run)."""
    from ..config import to_dict
    from .report import fingerprint

    train_prompts = {r["prompt"] for r in rows["train"]}
    shared = sum(r["prompt"] in train_prompts for r in rows["eval"])
    return {
        "task": cfg.task, "mode": "preferences", "files": files, "columns": ["prompt", "responses"],
        "rows_in": sum(len(r) for r in rows.values()) + len(rejects) + limited,
        "rows_out": sum(len(r) for r in rows.values()),
        "rows_per_split": {s: len(r) for s, r in rows.items()},
        "comparisons_per_split": {s: sum(len(x["responses"]) * (len(x["responses"]) - 1) // 2 for x in r)
                                  for s, r in rows.items()},
        "rejected_rows": len(rejects), "missing_handled": {}, "length_filtered": 0,
        "exact_duplicates_removed": 0, "near_duplicates_removed": 0, "conflicting_labels": 0,
        "leakage_found": {"eval": {"prompt_in_train": shared}} if shared else {}, "leakage_removed": 0,
        "pii_redacted": {}, "augmented_rows": 0, "augmented_by_kind": {}, "left_out_by_limits": limited,
        "label_counts": {}, "token_lengths": {},
        "fingerprint": fingerprint(rows, ["prompt", "responses"]),
        "settings": to_dict(cfg)["data"],
    }
