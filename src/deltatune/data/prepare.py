"""The data preparation pipeline: files -> clean, de-duplicated, split rows, and a report.

    load -> template -> check/clean/fill -> redact -> de-duplicate (per file) -> split
         -> leakage check (eval/test vs train) -> limits / few-shot -> augment (train only)

Every row that enters is counted where it leaves (the ledger), so the report's numbers add up:
rows_in = rows_out - augmented + rejected + dropped for missing values + length-filtered
          + duplicates + leakage removed + left out by limits. ``prepare_rows`` checks that.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..assets import resolve_data
from ..config import Config
from ..errors import DataError
from . import clean, dedup, split
from .load import FILE, ROW, iter_table, require_columns
from .report import build_report
from .template import Templates, templates_for

SPLITS = ("train", "eval", "test")
AUGMENTED = "_augmented"
REPORT = "data_report.json"


@dataclass
class Fields:
    """Which columns rows need, and what the pipeline may do with them (the task decides, see
    ``tasks/``): ``inputs`` are the texts (cleaned, redacted, compared for duplicates); ``label``
    is the class label or, with ``per_word``, the list of tags (one per word of the first input).
    ``kind`` names the shape of the rows for reports and prepared folders."""
    inputs: list[str]
    label: str | None = None
    kind: str = "text"
    per_word: bool = False       # inputs[0] and label are equal-length word and tag lists
    augmentable: bool = False    # one text column that augmentation may rewrite

    @property
    def columns(self) -> list[str]:
        return self.inputs + ([self.label] if self.label else [])

    @property
    def classes(self) -> str | None:
        """The column of a class label per row (splits are stratified by it), else None."""
        return None if self.per_word else self.label

    def key(self, row: dict) -> str:
        return "\x1f".join(" ".join(v) if isinstance(v, list) else str(v) for v in (row[c] for c in self.inputs))


FieldsFor = Callable[[set], Fields]  # the columns a file has -> the fields its rows are read by


@dataclass
class Ledger:
    rows_in: int = 0
    rejects: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)   # missing value, policy drop: by column
    filled: Counter = field(default_factory=Counter)    # missing value, policy fill: by column
    length_filtered: int = 0
    exact: Counter = field(default_factory=Counter)     # by split
    near: Counter = field(default_factory=Counter)      # by split
    conflicting_labels: int = 0                         # exact duplicates that disagreed on the label
    leaks: dict = field(default_factory=dict)           # split -> Counter(kind)
    leak_examples: list[dict] = field(default_factory=list)
    leakage_removed: int = 0
    pii: Counter = field(default_factory=Counter)
    augmented: Counter = field(default_factory=Counter)
    limited: int = 0                                    # left out by train_limit / eval_limit / shots
    control_chars: int = 0                              # rows whose control characters were stripped (kept)


@dataclass
class PreparedRows:
    splits: dict[str, list[dict]]
    fields: Fields
    report: dict
    rejects: list[dict]

    @property
    def mode(self) -> str:
        return self.fields.kind


class RowStage:
    """Loads one file and makes each row well-formed, or rejects it with a reason."""

    def __init__(self, cfg: Config, ledger: Ledger, fields_for: FieldsFor):
        self.cfg, self.d, self.ledger = cfg, cfg.data, ledger
        self.templates = Templates(templates_for(cfg.data))
        self.fields_for = fields_for
        self.fields: Fields | None = None  # chosen from the first file's columns
        self.redactor = None
        if self.d.pii.redact:
            from .pii import redact
            self.redactor = redact

    def load(self, path: str) -> list[dict]:
        return list(self.stream(path))

    def stream(self, path: str) -> Iterator[dict]:
        """The file's usable rows, one at a time (a file larger than memory streams through)."""
        malformed: list[dict] | None = [] if self.d.on_error == "skip" else None
        fields = None
        wrong_types: list[tuple[dict, str, object]] = []  # on_error=fail: gathered for one message, then raised
        for row in iter_table(path, malformed):
            self.ledger.rows_in += 1
            if fields is None:
                self.templates.check_columns([row], path)
                if self.fields is None:
                    self.fields = self.fields_for(set(row) | set(self.templates.compiled))
                fields = self.fields
                columns = [(c, f"data.{_key(self.d, c)}") for c in fields.columns if c not in self.templates.compiled]
                require_columns([row], path, columns)
            if self.templates.compiled and not self._keep(row, self.templates.render(row)):
                continue
            wrong = _wrong_type(row, fields)
            if wrong and self.d.on_error == "fail":
                wrong_types.append((row, *wrong))
                if len(wrong_types) == WRONG_TYPE_EXAMPLES:
                    break
                continue
            if wrong_types:  # failing: only look for more rows of the wrong type
                continue
            if wrong:
                self._keep(row, f"{_what(self.d, wrong[0])} column {wrong[0]!r} holds {_kind(wrong[1])}, not text")
            elif self._keep(row, self._clean(row, fields)):
                yield row
        if wrong_types:
            raise DataError(_wrong_types_message(path, self.d, wrong_types))
        self.ledger.rejects += malformed or []
        self.ledger.rows_in += len(malformed or [])
        if fields is None and not malformed:
            raise DataError(f"{path}: the file has no data rows; a data set needs at least one example")

    def _keep(self, row: dict, outcome: str | None) -> bool:
        if outcome is None:
            return True
        if outcome in ("dropped", "filtered"):
            return False
        if self.d.on_error == "fail":
            raise DataError(f"{row[FILE]}: row {row[ROW]}: {outcome}. Fix the row, or set data.on_error=skip "
                            "to skip bad rows (they are listed in rejects.jsonl)")
        self.ledger.rejects.append({"file": row[FILE], "row": row[ROW], "reason": outcome})
        return False

    def _clean(self, row: dict, fields: Fields) -> str | None:
        """None to keep the row; 'dropped' / 'filtered' when a policy removes it; else the reason."""
        c = self.d.clean
        problem = self._control_chars(row, fields)
        if problem:
            return problem
        for column in fields.columns:
            if clean.is_missing(row.get(column)):
                policy = c.missing.get(column, "error")
                if policy == "drop":
                    self.ledger.dropped[column] += 1
                    return "dropped"
                if policy == "error":
                    return f"{_what(self.d, column)} column {column!r} is empty"
                row[column] = c.fill[column]
                self.ledger.filled[column] += 1
        if fields.per_word:
            problem = _tagged(row, fields)
            if problem:
                return problem
        for column in fields.inputs:
            row[column] = self._text(row[column])
        if fields.label:
            value = row[fields.label]
            norm = lambda v: clean.normalize_label(v, c.lowercase_labels, c.label_map)  # noqa: E731
            row[fields.label] = [norm(v) for v in value] if isinstance(value, list) else norm(value)
        if any(clean.is_missing(row[col]) for col in fields.inputs):
            return "the text is empty after cleaning"
        size = len(fields.key(row))
        if size < c.min_chars or (c.max_chars and size > c.max_chars):
            self.ledger.length_filtered += 1
            return "filtered"
        return None

    def _control_chars(self, row: dict, fields: Fields) -> str | None:
        """Control characters in a label or tag: the reason to reject the row (data.control_chars=reject),
        or (strip) removed from labels, tags and text columns, the row counted."""
        strip = self.d.control_chars == "strip"
        changed = False
        for column in ([fields.label] if fields.label else []) + (fields.inputs if strip else []):
            value = row.get(column)
            values = value if isinstance(value, list) else [value]
            found = next(((v, at) for v in values if isinstance(v, str) for at in [clean.find_control(v)]
                          if at >= 0), None)
            if found is None:
                continue
            if not strip:
                v, at = found
                return (f"{_what(self.d, column)} column {column!r} holds {_snippet(v, at)}, which has a control "
                        f"character (U+{ord(v[at]):04X} at position {at + 1}): it would be a "
                        f"{'tag' if fields.per_word else 'label'} of its own, not {clean.strip_control(v).strip()!r}; "
                        "remove it from the file, or set data.control_chars=strip to remove control characters")
            cleaned = [clean.strip_control(v) if isinstance(v, str) else v for v in values]
            row[column] = cleaned if isinstance(value, list) else cleaned[0]
            changed = True
        self.ledger.control_chars += changed
        return None

    def _text(self, value):
        if isinstance(value, list):  # token lists: clean and redact word by word, keeping the alignment
            return [self._text(v) for v in value]
        text = str(value)
        if self.d.clean.strip_html:
            text = clean.strip_html(text)
        if self.d.clean.normalize:
            text = clean.normalize_text(text)
        if self.redactor:
            text, counts = self.redactor(text, self.d.pii.types)
            self.ledger.pii.update(counts)
        return text


def _what(d, column: str) -> str:
    names = {d.text_column: "text", d.label_column: "label", d.prompt_column: "prompt",
             d.response_column: "response", d.tokens_column: "tokens", d.tags_column: "tags"}
    return names.get(column, column)


def _key(d, column: str) -> str:
    return f"{_what(d, column)}_column"


WRONG_TYPE_EXAMPLES = 5  # rows named when a text column holds something else


def _wrong_type(row: dict, fields: Fields) -> tuple[str, object] | None:
    """(column, value) of a text column holding something other than text (a number, a list, ...), or
    of a label column holding a list or mapping. Missing values are the missing-value policy's.
    Word and tag lists (token classification) are checked by ``_tagged``."""
    if fields.per_word:
        return None
    for column in fields.inputs:
        value = row.get(column)
        if not isinstance(value, str) and not clean.is_missing(value):
            return column, value
    value = row.get(fields.label) if fields.label else None
    if isinstance(value, (list, tuple, dict)) and not clean.is_missing(value):
        return fields.label, value
    return None


def _kind(value: object) -> str:
    kinds = {bool: "true/false (bool)", int: "a number (int)", float: "a number (float)", list: "a list",
             tuple: "a list", dict: "a mapping"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _short(value: object, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _snippet(text: str, at: int, width: int = 40) -> str:
    """repr of ``text``, or of the part around position ``at`` when it is long."""
    if len(text) <= 2 * width:
        return repr(text)
    start = max(0, at - width // 2)
    return f"{'...' if start else ''}{text[start:start + width]!r}..."


def _wrong_types_message(path: str, d, found: list[tuple[dict, str, object]]) -> str:
    column = found[0][1]
    rows = [(row, value) for row, col, value in found if col == column]
    kinds = sorted({_kind(v) for _, v in rows})
    shown = ", ".join(f"row {row[ROW]} ({_short(v)})" for row, v in rows)
    more = " and possibly more" if len(found) == WRONG_TYPE_EXAMPLES else ""
    what = _what(d, column)
    if what == "label":
        fix = "give one label per row (text or a whole-number class id)"
    elif any(isinstance(v, (list, tuple)) for _, v in rows):
        fix = (f"join the list into one string (e.g. ' '.join(words)); for one tag per word use "
               f"task=token_classification; or set data.{_key(d, column)} to the column that holds the text")
    else:
        fix = (f"write the column as strings (e.g. pandas: df[{column!r}] = df[{column!r}].astype(str)) if the values "
               f"are meant as text, or set data.{_key(d, column)} to the column that holds the text")
    return (f"{path}: {what} column {column!r} (data.{_key(d, column)}) must hold "
            f"{'one label' if what == 'label' else 'text'} in every row, but these rows hold {' or '.join(kinds)}: "
            f"{shown}{more}. {fix[0].upper()}{fix[1:]}")


def _tagged(row: dict, fields: Fields) -> str | None:
    """Words and tags as equal-length lists of strings (a string is split on whitespace)."""
    words, tags = fields.inputs[0], fields.label
    for column in (words, tags):
        value = row[column]
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            return (f"column {column!r} must be a non-empty list of words (or a string of words separated by "
                    f"spaces), got {row[column]!r}")
        row[column] = value
    if len(row[words]) != len(row[tags]):
        return f"{len(row[words])} words but {len(row[tags])} tags; give exactly one tag per word"
    return None


# ----------------------------------------------------------------------------- the pipeline

def prepare_rows(cfg: Config, fields_for: FieldsFor, tokenizer=None) -> PreparedRows:
    """Run the whole pipeline in memory. ``fields_for`` is the task's (``Task.fields``);
    ``tokenizer`` (optional) adds token-length figures. Multi-task data (``data.tasks``) is
    prepared by ``data.multitask.prepare_tasks``."""
    train_ref = resolve_data(cfg.data.train)
    if (Path(train_ref) / REPORT).is_file():
        return load_prepared(cfg, Path(train_ref), fields_for)
    ledger = Ledger()
    stage = RowStage(cfg, ledger, fields_for)
    splits, files = run_pipeline(cfg, stage, ledger)
    report = build_report(cfg, splits, stage.fields, ledger, files, tokenizer)
    return PreparedRows(splits, stage.fields, report, ledger.rejects)


def run_pipeline(cfg: Config, stage: RowStage, ledger: Ledger) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """data.train/eval/test -> (rows per split, file per split): everything but the report."""
    d = cfg.data
    files = {s: str(resolve_data(ref)) for s, ref in (("train", d.train), ("eval", d.eval), ("test", d.test)) if ref}
    loaded = {s: stage.load(path) for s, path in files.items()}
    if not loaded["train"]:
        raise DataError(f"{files['train']}: no usable rows (all {len(ledger.rejects)} rejected; see rejects.jsonl)")
    fields = stage.fields
    loaded = {s: _deduplicate(rows, s, fields, d.dedup, ledger) for s, rows in loaded.items()}
    splits = _split(cfg, loaded, fields.classes)
    _check_leakage(splits, fields, d.dedup, ledger)
    _apply_limits(cfg, splits, fields.classes, ledger, files["train"])
    if not splits["eval"]:
        raise DataError(f"{files['train']}: no rows left for evaluation; add data, raise data.eval_fraction "
                        "or give data.eval")
    _augment(cfg, splits, fields, ledger)
    return splits, files


def _deduplicate(rows, name, fields, cfg, ledger) -> list[dict]:
    if cfg.exact:
        rows, removed = dedup.exact_duplicates(rows, fields.key)
        ledger.exact[name] += len(removed)
        if fields.label:
            ledger.conflicting_labels += sum(r[fields.label] != twin[fields.label] for r, twin in removed)
    if cfg.near:
        rows, removed = dedup.near_duplicates(rows, fields.key, cfg)
        ledger.near[name] += len(removed)
    return rows


def _split(cfg: Config, loaded: dict, label: str | None) -> dict[str, list[dict]]:
    """Stratified by the class column ``label`` when there is one."""
    d, seed = cfg.data, cfg.train.seed
    rest = loaded["train"]
    test = loaded.get("test")
    if test is None:
        rest, test = split.split_rows(rest, d.test_fraction, seed + 1, label) if d.test_fraction else (rest, [])
    if "eval" in loaded:
        return {"train": rest, "eval": loaded["eval"], "test": test}
    if d.kfold:
        train, held = split.kfold(rest, d.kfold, d.fold, seed, label)
    else:
        share = d.eval_fraction / (1 - d.test_fraction) if "test" not in loaded else d.eval_fraction
        train, held = split.split_rows(rest, share, seed, label)
    return {"train": train, "eval": held, "test": test}


def _check_leakage(splits, fields, cfg, ledger) -> None:
    for name in ("eval", "test"):
        leaks = dedup.find_leaks(splits["train"], splits[name], fields.key, cfg, near=True)
        ledger.leaks[name] = Counter(leak.kind for leak in leaks)
        ledger.leak_examples += [{"split": name, "kind": lk.kind, "file": lk.row[FILE], "row": lk.row[ROW],
                                  "train_file": lk.train_row[FILE], "train_row": lk.train_row[ROW]}
                                 for lk in leaks]
        if cfg.leakage == "remove" and leaks:
            leaked = {id(lk.row) for lk in leaks}
            splits[name] = [r for r in splits[name] if id(r) not in leaked]
            ledger.leakage_removed += len(leaks)


def _apply_limits(cfg, splits, label, ledger, where) -> None:
    d, seed = cfg.data, cfg.train.seed
    before = len(splits["train"]) + len(splits["eval"])
    if d.shots_per_class:
        if label is None:
            raise DataError("data.shots_per_class: few-shot sets are per class; it needs task: classification")
        splits["train"] = split.shots(splits["train"], d.shots_per_class, seed, label, where)
    if d.train_limit:
        splits["train"] = split.take(splits["train"], d.train_limit, seed, label)
    if d.eval_limit:
        splits["eval"] = split.take(splits["eval"], d.eval_limit, seed, label)
    ledger.limited += before - len(splits["train"]) - len(splits["eval"])


def _augment(cfg, splits, fields, ledger) -> None:
    """New training rows only; one that repeats an eval/test row exactly is dropped, so augmented
    text never leaks into evaluation."""
    a = cfg.data.augment
    if not (a.eda or a.paraphrase or a.oversample):
        return
    if not fields.augmentable:
        raise DataError(f"data.augment: augmentation rewrites one text column; it works for classification "
                        f"and plain-text causal-LM data, not {fields.kind!r} rows")
    from . import augment

    train, column, seed = splits["train"], fields.inputs[0], cfg.train.seed
    new: list[dict] = []
    if a.eda:
        from .lexicon import load_lexicon
        new += augment.augment_rows(train, column, a.eda, seed, load_lexicon(), a.operations, a.alpha)
    if a.paraphrase:
        new += _paraphrases(train, column, a, seed)
    if a.oversample:
        if fields.label is None:
            raise DataError("data.augment.oversample: re-balancing needs class labels (task: classification)")
        new += augment.oversample(train + new, fields.label, seed)
    held = {fields.key(r).casefold() for r in splits["eval"] + splits["test"]}
    new = [r for r in new if fields.key(r).casefold() not in held]
    ledger.augmented.update(r[AUGMENTED] for r in new)
    splits["train"] = train + new
    random.Random(seed).shuffle(splits["train"])


def _paraphrases(rows, column, a, seed) -> list[dict]:
    from ..assets import resolve_model
    from ..models import load_model, load_tokenizer
    from .augment import paraphrase

    path = resolve_model(a.paraphrase_model)
    tokenizer = load_tokenizer(path)
    model = load_model(path, "causal", None, tokenizer.pad_token_id)
    return paraphrase(rows, column, model, tokenizer, per_row=a.paraphrase, seed=seed)


# ----------------------------------------------------------------------------- prepared folders

def load_prepared(cfg: Config, folder: Path, fields_for: FieldsFor) -> PreparedRows:
    """Rows written by `deltatune data prepare`: used as they are (no second cleaning or augmentation)."""
    import pyarrow.parquet as pq

    report = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    if report.get("task") != cfg.task:
        raise DataError(f"{folder}: prepared for task {report.get('task')!r}, but this config trains "
                        f"{cfg.task!r}; prepare the data again with this config")
    if cfg.data.eval or cfg.data.test:
        raise DataError(f"{folder}: a prepared folder brings its own eval/test splits; unset data.eval/data.test")
    fields = fields_for(set(report.get("columns", [])))
    splits = {}
    for name in SPLITS:
        path = folder / f"{name}.parquet"
        rows = pq.read_table(path).to_pylist() if path.is_file() else []
        if rows:
            require_columns(rows, str(path), [(c, f"data.{_key(cfg.data, c)}") for c in fields.columns])
        splits[name] = rows
    if not splits["train"] or not splits["eval"]:
        raise DataError(f"{folder}: the prepared folder has no train or eval rows; run `deltatune data prepare` again")
    rejects_path = folder / "rejects.jsonl"
    rejects = [json.loads(x) for x in rejects_path.read_text().splitlines()] if rejects_path.is_file() else []
    return PreparedRows(splits, fields, report, rejects)


def write_prepared(prepared: PreparedRows, out: Path, config_yaml: str) -> Path:
    """Splits as Parquet, the report as JSON and HTML, rejects, and the config that made them;
    written to a temporary folder and renamed into place, so a failure leaves nothing half-written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .report import render_html

    columns = prepared.fields.columns + [ROW, FILE, AUGMENTED]

    def build(tmp: Path) -> None:
        for name, rows in prepared.splits.items():
            if rows:
                table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
                pq.write_table(table, tmp / f"{name}.parquet")
        (tmp / REPORT).write_text(json.dumps(prepared.report, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "data_report.html").write_text(render_html(prepared.report), encoding="utf-8")
        (tmp / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                   for r in prepared.rejects), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")

    return replace_prepared(Path(out), build)


PREPARED_FILES = {f"{split}.parquet" for split in SPLITS} | {REPORT, "data_report.html", "rejects.jsonl", "config.yaml"}


def replace_prepared(out: Path, build) -> Path:
    """Write a prepared data folder (``data prepare --out``): into a missing or empty folder, or over an
    earlier prepared folder holding only what ``data prepare`` writes; never over anything else."""
    from ..fs import replace_dir

    check_prepared_out(out)
    return replace_dir(out, build, owned=True)


def check_prepared_out(out: Path) -> None:
    from ..fs import foreign_entries

    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / REPORT).is_file():
            raise DataError(f"{out}: exists and is not a prepared data folder; choose another --out")
        foreign = foreign_entries(out, lambda p: p.name in PREPARED_FILES)
        if foreign:
            raise DataError(f"{out}: a prepared data folder, but it also holds files data prepare did not write "
                            f"({', '.join(foreign[:5])}); move them out or choose another --out")
