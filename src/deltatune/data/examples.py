"""Turn rows into tokenized examples for a task, split and fingerprint them.

Classification examples: ``input_ids`` and ``label`` (an index into the saved label list).
Causal-LM examples: ``input_ids`` and ``labels`` with -100 on prompt tokens, so the loss covers
the response only (the tokenizer's chat template frames the pair when it has one).
Preference examples (tasks reward and dpo) come from preference files (``data.preferences.load_preferences``):
reward: ``responses``, the token ids of prompt + each response, best first; dpo: one example per
(chosen, rejected) pair, each side a causal-LM example. Both carry the task's ``objective``.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

from ..assets import resolve_data
from ..config import Config
from ..errors import DataError
from . import split
from .load import FILE, ROW
from .preferences import Preference, load_preferences, to_pairs
from .prepare import Ledger, RowStage, prepare_rows

IGNORE = -100
PREFERENCE_TASKS = ("reward", "dpo")


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


def prompt_ids(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    """Token ids of ``prompt_text``: what training puts before a response and generation continues
    (a BOS token first when there is no chat template to hold the special tokens)."""
    ids = tokenizer(prompt_text(tokenizer, prompt, use_chat_template), add_special_tokens=False)["input_ids"]
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


def sft_example(tokenizer, prompt: str, response: str, use_chat_template: bool, max_len: int) -> dict | None:
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


def encode_sft(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    d, max_len = cfg.data, cfg.train.max_length
    encoded = [sft_example(tokenizer, row[d.prompt_column], row[d.response_column], d.chat_template, max_len)
               for row in rows]
    _note_truncated(sum(e is None for e in encoded), max_len)
    return [e for e in encoded if e is not None]


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
    if cfg.task in PREFERENCE_TASKS:
        return prepare_preferences(cfg, tokenizer)
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
    if cfg.task in PREFERENCE_TASKS:
        return encode_preferences(load_preferences(path, cfg.data.on_error), tokenizer, cfg)
    stage = RowStage(cfg, Ledger())
    rows = stage.load(path)
    if not rows:
        raise DataError(f"{path}: no usable rows")
    if labels:
        check_known_labels(rows, cfg.data.label_column if stage.mode == "classification" else cfg.data.tags_column,
                           labels)
    encode, _ = encoder(cfg, tokenizer, stage.mode, labels)
    return encode(rows)


# ----------------------------------------------------------------------------- preferences (reward, dpo)

def objective(cfg: Config) -> dict:
    """The loss settings of a preference task. They travel with every example into its batch:
    the loop hands the loss a batch, not the config. (DPO examples are specific to them anyway:
    IPO's reference log-probabilities are per-token means, the sigmoid loss's are sums.)"""
    if cfg.task == "reward":
        return {"loss": cfg.reward.loss}
    return {"loss": cfg.dpo.loss, "beta": cfg.dpo.beta}


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


def encode_preferences(prefs: list[Preference], tokenizer, cfg: Config) -> list[dict]:
    d, max_len, goal = cfg.data, cfg.train.max_length, objective(cfg)
    if cfg.task == "reward":
        ids = reward_ids(tokenizer, [p.prompt for p in prefs for _ in p.responses],
                         [r for p in prefs for r in p.responses], d.chat_template, max_len)
        out, start = [], 0
        for p in prefs:
            out.append({"responses": ids[start:start + len(p.responses)], "objective": goal})
            start += len(p.responses)
        return out
    out, dropped = [], 0
    for prompt, chosen, rejected in to_pairs(prefs):
        sides = [sft_example(tokenizer, prompt, r, d.chat_template, max_len) for r in (chosen, rejected)]
        if None in sides:
            dropped += 1
            continue
        out.append({"chosen": sides[0], "rejected": sides[1], "objective": goal})
    _note_truncated(dropped, max_len, "pair(s)")
    return out


def split_by_prompt(prefs: list[Preference], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded share of the distinct prompts is held out with all their
    preferences, so no prompt is compared in training and scored in evaluation."""
    prompts = list(dict.fromkeys(p.prompt for p in prefs))
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:round(len(prompts) * fraction)])
    return [p for p in prefs if p.prompt not in held], [p for p in prefs if p.prompt in held]


def prepare_preferences(cfg: Config, tokenizer) -> PreparedData:
    """Preference files -> split by prompt -> limits -> examples, with a data report."""
    d, seed = cfg.data, cfg.train.seed
    files = {s: str(resolve_data(ref)) for s, ref in (("train", d.train), ("eval", d.eval)) if ref}
    rejects: list[dict] = []
    loaded = {s: load_preferences(path, d.on_error, rejects) for s, path in files.items()}
    if "eval" in loaded:
        splits = {"train": loaded["train"], "eval": loaded["eval"]}
    else:
        splits = dict(zip(("train", "eval"), split_by_prompt(loaded["train"], d.eval_fraction, seed)))
        if not splits["train"] or not splits["eval"]:
            prompts = len({p.prompt for p in loaded["train"]})
            raise DataError(f"{files['train']}: {prompts} distinct prompt(s) cannot be split into training and "
                            f"evaluation prompts with data.eval_fraction={d.eval_fraction} (a prompt's preferences "
                            "stay together); add prompts, change data.eval_fraction or give data.eval")
    before = sum(len(v) for v in splits.values())
    for name, limit in (("train", d.train_limit), ("eval", d.eval_limit)):
        if limit:
            splits[name] = split.take(splits[name], limit, seed, None)
    rows = {name: [{"prompt": p.prompt, "responses": p.responses, FILE: p.source[0], ROW: p.source[1]} for p in prefs]
            for name, prefs in splits.items()}
    report = _preference_report(cfg, files, rows, rejects, before - sum(len(v) for v in splits.values()))
    examples = {name: encode_preferences(prefs, tokenizer, cfg) for name, prefs in splits.items()}
    if not examples["train"] or not examples["eval"]:
        raise DataError(f"{files['train']}: no usable preference examples after truncating to train.max_length="
                        f"{cfg.train.max_length}; raise it")
    return PreparedData(Split(rows["train"], examples["train"]), Split(rows["eval"], examples["eval"]), None,
                        report["fingerprint"], "preferences", report=report, rejects=rejects)


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
