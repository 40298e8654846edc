"""Turn rows into tokenized examples for a task, split and fingerprint them.

Classification examples: ``input_ids`` and ``label`` (an index into the saved label list).
Causal-LM examples: ``input_ids`` and ``labels`` with -100 on prompt tokens, so the loss covers
the response only (the tokenizer's chat template frames the pair when it has one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..config import Config
from ..errors import DataError
from .load import ROW
from .prepare import Ledger, RowStage, prepare_rows

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
    mode: str  # "classification", "tokens", "seq2seq", "sft" or "text"
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


def encoder(cfg: Config, tokenizer, mode: str, labels: list[str] | None):
    """rows -> examples for the mode, plus the columns they read."""
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


def prepare(cfg: Config, tokenizer) -> PreparedData:
    """The preparation pipeline (or a prepared folder), then labels and tokenization."""
    rows = prepare_rows(cfg, tokenizer)
    train_rows, eval_rows, test_rows = (rows.splits[s] for s in ("train", "eval", "test"))
    where = rows.report["files"].get("train", cfg.data.train)
    labels = None
    if rows.mode == "classification":
        labels = label_list(train_rows, eval_rows + test_rows, cfg.data.label_column, where)
    elif rows.mode == "tokens":
        # Tag sets are large and some tags are rare: one seen only in evaluation is still a tag the
        # head should have (it simply scores 0 recall), not a typo as an unknown class label would be.
        labels = label_list(train_rows + eval_rows + test_rows, [], cfg.data.tags_column, where)
    encode, _ = encoder(cfg, tokenizer, rows.mode, labels)
    train = Split(train_rows, encode(train_rows))
    if not train.examples:
        raise DataError(f"{where}: no usable training examples after tokenization")
    if cfg.data.pack:
        from .pack import pack
        train.examples = pack(train.examples, cfg.train.max_length)
    return PreparedData(train, Split(eval_rows, encode(eval_rows)), labels, rows.report["fingerprint"],
                        rows.mode, Split(test_rows, encode(test_rows) if test_rows else []), rows.report, rows.rejects)


def prepare_eval_file(cfg: Config, tokenizer, path: str, labels: list[str] | None) -> list[dict]:
    """Examples from one more file, cleaned and formatted like the run's training data and checked
    against its columns and labels (no de-duplication or splitting)."""
    stage = RowStage(cfg, Ledger())
    rows = stage.load(path)
    if not rows:
        raise DataError(f"{path}: no usable rows")
    if labels:
        check_known_labels(rows, cfg.data.label_column if stage.mode == "classification" else cfg.data.tags_column,
                           labels)
    encode, _ = encoder(cfg, tokenizer, stage.mode, labels)
    return encode(rows)
