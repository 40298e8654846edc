"""Turn rows into tokenized examples for a task, split and fingerprint them.

Classification examples: ``input_ids`` and ``label`` (an index into the saved label list).
Causal-LM examples: ``input_ids`` and ``labels`` with -100 on prompt tokens, so the loss covers
the response only (the tokenizer's chat template frames the pair when it has one).
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from ..config import Config
from ..errors import DataError
from .load import ROW, cell, load_table, require_columns

IGNORE = -100


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
    mode: str  # "classification", "sft" or "text"


def load_rows(cfg: Config, path: str) -> tuple[list[dict], str]:
    """Load a file and check every row for the task; returns (rows, mode)."""
    rows = load_table(path)
    mode = _mode(cfg, rows)
    _check_rows(cfg, rows, path, mode)
    return rows, mode


def read_splits(cfg: Config, train_path: str, eval_path: str | None) -> tuple[list[dict], list[dict], str]:
    """Load, check and split the rows; returns (train_rows, eval_rows, mode)."""
    d = cfg.data
    train_rows, mode = load_rows(cfg, train_path)
    label = d.label_column if mode == "classification" else None
    if eval_path:
        eval_rows, _ = load_rows(cfg, eval_path)
    else:
        train_rows, eval_rows = split_rows(train_rows, d.eval_fraction, cfg.train.seed, label)
    if d.train_limit:
        train_rows = take(train_rows, d.train_limit, cfg.train.seed, label)
    if d.eval_limit:
        eval_rows = take(eval_rows, d.eval_limit, cfg.train.seed, label)
    if not eval_rows:
        raise DataError(f"{train_path}: no rows left for evaluation; add data, raise data.eval_fraction "
                        "or give data.eval")
    return train_rows, eval_rows, mode


def _mode(cfg: Config, rows: list[dict]) -> str:
    """How rows become examples. A causal LM trains SFT when the file has prompt/response columns."""
    fixed = {"classification": "classification", "token_classification": "tokens", "seq2seq": "seq2seq"}
    if cfg.task in fixed:
        return fixed[cfg.task]
    d = cfg.data
    return "sft" if d.prompt_column in rows[0] or d.response_column in rows[0] else "text"


def _check_rows(cfg: Config, rows: list[dict], path: str, mode: str) -> None:
    d = cfg.data
    pairs = [(d.prompt_column, "prompt"), (d.response_column, "response")]
    columns = {"classification": [(d.text_column, "text"), (d.label_column, "label")], "sft": pairs,
               "seq2seq": pairs, "text": [(d.text_column, "text")],
               "tokens": [(d.tokens_column, "tokens"), (d.tags_column, "tags")]}[mode]
    require_columns(rows, path, [(c, f"data.{what}_column") for c, what in columns])
    for row in rows:
        row["_file"] = path
        if mode == "tokens":
            _check_tagged(row, d.tokens_column, d.tags_column, path)
            continue
        for column, what in columns:
            row[column] = cell(row, column, path, what)


def _check_tagged(row: dict, tokens: str, tags: str, path: str) -> None:
    """Words and tags as equal-length lists of strings (a string is split on whitespace)."""
    for column in (tokens, tags):
        value = row[column]
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise DataError(f"{path}: row {row[ROW]}: column {column!r} must be a non-empty list of words "
                            f"(or a string of words separated by spaces), got {row[column]!r}")
        row[column] = value
    if len(row[tokens]) != len(row[tags]):
        raise DataError(f"{path}: row {row[ROW]}: {len(row[tokens])} words but {len(row[tags])} tags; "
                        "give exactly one tag per word")


def split_rows(rows: list[dict], fraction: float, seed: int, label: str | None) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out split, stratified by label when one is given."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row[label] if label else ""].append(row)
    rng = random.Random(seed)
    train, held = [], []
    for key in sorted(groups):
        group = groups[key][:]
        rng.shuffle(group)
        n_eval = round(len(group) * fraction)
        held += group[:n_eval]
        train += group[n_eval:]
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def take(rows: list[dict], n: int, seed: int, label: str | None) -> list[dict]:
    """At most n rows, keeping label proportions when a label is given."""
    if n >= len(rows):
        return rows
    if label is None:
        return random.Random(seed).sample(rows, n)
    kept, _ = split_rows(rows, 1 - n / len(rows), seed, label)
    return kept[:n]


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

def encode_classification(rows: list[dict], tokenizer, cfg: Config, labels: list[str]) -> list[dict]:
    index = {name: i for i, name in enumerate(labels)}
    texts = [r[cfg.data.text_column] for r in rows]
    ids = tokenizer(texts, truncation=True, max_length=cfg.train.max_length)["input_ids"]
    return [{"input_ids": x, "label": index[r[cfg.data.label_column]]} for x, r in zip(ids, rows)]


def prompt_text(tokenizer, prompt: str, use_chat_template: bool) -> str:
    """The text the model sees before it answers (shared by training and predict)."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def _response_text(tokenizer, prompt: str, response: str, use_chat_template: bool) -> str:
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        head = prompt_text(tokenizer, prompt, True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(head):
            return full[len(head):]
    return response + (tokenizer.eos_token or "")


def encode_sft(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    d, max_len = cfg.data, cfg.train.max_length
    out, dropped = [], 0
    for row in rows:
        prompt, response = row[d.prompt_column], row[d.response_column]
        head = tokenizer(prompt_text(tokenizer, prompt, d.chat_template), add_special_tokens=False)["input_ids"]
        if not d.chat_template or not getattr(tokenizer, "chat_template", None):
            if tokenizer.bos_token_id is not None:
                head = [tokenizer.bos_token_id] + head
        tail = tokenizer(_response_text(tokenizer, prompt, response, d.chat_template),
                         add_special_tokens=False)["input_ids"]
        ids = (head + tail)[:max_len]
        labels = ([IGNORE] * len(head) + tail)[:max_len]
        if all(x == IGNORE for x in labels):
            dropped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    if dropped:
        print(f"note: {dropped} example(s) had no response tokens left after truncating to "
              f"train.max_length={max_len} and were skipped", file=sys.stderr)
    return out


def encode_text(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for row in rows:
        ids = (tokenizer(row[cfg.data.text_column])["input_ids"] + eos)[: cfg.train.max_length]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def encode_tagged(rows: list[dict], tokenizer, cfg: Config, labels: list[str]) -> list[dict]:
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


def encode_seq2seq(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    d, max_len = cfg.data, cfg.train.max_length
    sources = tokenizer([r[d.prompt_column] for r in rows], truncation=True, max_length=max_len)["input_ids"]
    targets = tokenizer(text_target=[r[d.response_column] for r in rows], truncation=True,
                        max_length=max_len)["input_ids"]
    return [{"input_ids": s, "labels": t} for s, t in zip(sources, targets)]


def fingerprint(train: list[dict], eval_: list[dict], columns: list[str]) -> str:
    """sha256 over exactly the fields used, in order: equal data gives an equal fingerprint."""
    h = hashlib.sha256()
    for name, rows in (("train", train), ("eval", eval_)):
        h.update(name.encode())
        for row in rows:
            h.update(json.dumps([row.get(c) for c in columns], ensure_ascii=False).encode())
    return h.hexdigest()


def encoder(cfg: Config, tokenizer, mode: str, labels: list[str] | None):
    """rows -> examples for the mode, plus the columns the data fingerprint covers."""
    d = cfg.data
    if mode == "classification":
        return (lambda rows: encode_classification(rows, tokenizer, cfg, labels)), [d.text_column, d.label_column]
    if mode == "tokens":
        return (lambda rows: encode_tagged(rows, tokenizer, cfg, labels)), [d.tokens_column, d.tags_column]
    if mode == "seq2seq":
        return (lambda rows: encode_seq2seq(rows, tokenizer, cfg)), [d.prompt_column, d.response_column]
    if mode == "sft":
        return (lambda rows: encode_sft(rows, tokenizer, cfg)), [d.prompt_column, d.response_column]
    return (lambda rows: encode_text(rows, tokenizer, cfg)), [d.text_column]


def prepare(cfg: Config, tokenizer, train_path: str, eval_path: str | None) -> PreparedData:
    train_rows, eval_rows, mode = read_splits(cfg, train_path, eval_path)
    labels = None
    if mode == "classification":
        labels = label_list(train_rows, eval_rows, cfg.data.label_column, train_path)
    elif mode == "tokens":
        # Tag sets are large and some tags are rare: one seen only in evaluation is still a tag the
        # head should have (it simply scores 0 recall), not a typo as an unknown class label would be.
        labels = label_list(train_rows + eval_rows, [], cfg.data.tags_column, train_path)
    encode, columns = encoder(cfg, tokenizer, mode, labels)
    train, eval_ = Split(train_rows, encode(train_rows)), Split(eval_rows, encode(eval_rows))
    if not train.examples:
        raise DataError(f"{train_path}: no usable training examples after tokenization")
    return PreparedData(train, eval_, labels, fingerprint(train_rows, eval_rows, columns), mode)


def prepare_eval_file(cfg: Config, tokenizer, path: str, labels: list[str] | None) -> list[dict]:
    """Examples from one more file, checked against a finished run's columns and labels."""
    rows, mode = load_rows(cfg, path)
    if labels:
        check_known_labels(rows, cfg.data.label_column if mode == "classification" else cfg.data.tags_column, labels)
    encode, _ = encoder(cfg, tokenizer, mode, labels)
    return encode(rows)
