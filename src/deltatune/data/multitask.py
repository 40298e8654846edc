"""Multi-task classification data: several labelled data sets -> one set for one model.

Each task (``data.tasks``: name -> {train, eval, text_column, label_column}) goes through the
whole single-task pipeline on its own: cleaning, de-duplication, split, leakage check, limits
(``data.train_limit`` / ``data.eval_limit`` are per task) and augmentation. Then every text gets
the task's name as a prefix ("sentiment: ...", unless ``data.task_prefix`` is false) and every label the task's namespace
("sentiment/positive"), so the model knows which task it is doing and a label two tasks share
stays two classes. Training is then ordinary classification over the union of the labels, with
one shared head; ``metrics.multitask_metrics`` scores each example against its own task's
labels only and reports every task separately.
"""

from __future__ import annotations

import dataclasses
import difflib
import random
import re
from collections import Counter

from ..assets import DATASETS, check_data_ref, resolve_data
from ..config import Config
from ..errors import DataError
from ..metrics import TASK_SEPARATOR
from .load import FILE, ROW
from .prepare import AUGMENTED, SPLITS, FieldsFor, Ledger, PreparedRows, RowStage, run_pipeline
from .report import build_report

TASK_KEYS = ("train", "eval", "text_column", "label_column")
# What each task's own section of the data report shows (the rest is in the combined report).
REPORT_KEYS = ("files", "rows_in", "rows_out", "rows_per_split", "rejected_rows", "exact_duplicates_removed",
               "near_duplicates_removed", "conflicting_labels", "leakage_found", "leakage_removed",
               "augmented_rows", "left_out_by_limits", "label_counts")


def task_prefix(task: str) -> str:
    """What the model reads before each text of ``task`` (also what to prepend at prediction time)."""
    return f"{task}: "


def task_label(task: str, label: str) -> str:
    return f"{task}{TASK_SEPARATOR}{label}"


def task_config(cfg: Config, task: str) -> Config:
    """The single-task config of one task: its files and columns, every other data.* setting shared."""
    spec, d = cfg.data.tasks[task], cfg.data
    for key in ("train", "eval"):
        ref = spec.get(key)
        if ref and ref not in DATASETS and not resolve_data(ref).is_file():
            raise DataError(f"data.tasks.{task}.{key}: file {ref} does not exist; give a data file or a "
                            f"packaged data set ({', '.join(DATASETS)})")
    data = dataclasses.replace(d, train=spec["train"], eval=spec.get("eval"), test=None, tasks={},
                               text_column=spec.get("text_column", d.text_column),
                               label_column=spec.get("label_column", d.label_column))
    return dataclasses.replace(cfg, data=data)


def prepare_tasks(cfg: Config, fields_for: FieldsFor, tokenizer=None) -> PreparedRows:
    """Every task's rows, prefixed and namespaced, in one set of splits (train shuffled with the seed).
    ``fields_for`` is the (classification) task's, applied to each task's own columns."""
    d = cfg.data
    fields = fields_for(set())
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    ledger, files, sections = Ledger(), {}, {}
    for name in d.tasks:
        one = task_config(cfg, name)
        task_ledger = Ledger()
        own = dataclasses.replace(fields, inputs=[one.data.text_column], label=one.data.label_column)
        stage = RowStage(one, task_ledger, lambda columns: own)
        task_splits, task_files = run_pipeline(one, stage, task_ledger)
        _check_classes(name, task_splits["train"], one.data.label_column, task_files["train"])
        report = build_report(one, task_splits, own, task_ledger, task_files, None)
        sections[name] = {k: report[k] for k in REPORT_KEYS}
        for split, rows in task_splits.items():
            splits[split] += [_namespaced(r, name, one.data, fields) for r in rows]
        files.update({f"{name}.{split}": path for split, path in task_files.items()})
        _merge(ledger, task_ledger)
    random.Random(cfg.train.seed).shuffle(splits["train"])
    report = build_report(cfg, splits, fields, ledger, files, tokenizer)
    report["tasks"] = sections
    return PreparedRows(splits, fields, report, ledger.rejects)


def _namespaced(row: dict, task: str, source, fields) -> dict:
    out = {k: row[k] for k in (FILE, ROW, AUGMENTED) if k in row}
    out[fields.inputs[0]] = (task_prefix(task) if source.task_prefix else "") + row[source.text_column]
    out[fields.label] = task_label(task, row[source.label_column])
    return out


def _check_classes(task: str, rows: list[dict], column: str, path: str) -> None:
    found = sorted({r[column] for r in rows})
    if len(found) < 2:
        raise DataError(f"data.tasks.{task}: {path}: column {column!r} has {len(found)} class(es) "
                        f"({', '.join(map(repr, found)) or 'none'}) in the training data; every task needs at "
                        "least two")


def _merge(total: Ledger, part: Ledger) -> None:
    """Add one task's counts to the combined ledger (so the combined report adds up too)."""
    for f in dataclasses.fields(Ledger):
        mine, theirs = getattr(total, f.name), getattr(part, f.name)
        if isinstance(mine, dict) and not isinstance(mine, Counter):  # leaks: split -> Counter(kind)
            for split, kinds in theirs.items():
                mine.setdefault(split, Counter()).update(kinds)
        else:
            setattr(total, f.name, mine + theirs)


# ----------------------------------------------------------------------------- validation

def check_tasks(d, check_paths: bool = False) -> list[str]:
    """Problems with ``data.tasks`` (config validation; every problem at once; whether the task
    trains several tasks at once is the task's own check)."""
    if not d.tasks:
        return []
    problems = [f"data.{key}: leave it unset with data.tasks; each task names its own files "
                f"(data.tasks.<task>.train / .eval)" for key in ("train", "eval", "test") if getattr(d, key)]
    if len(d.tasks) < 2:
        problems.append(f"data.tasks: multi-task training needs at least two tasks, got {len(d.tasks)} "
                        f"({', '.join(d.tasks)}); for one task use data.train")
    for name, spec in d.tasks.items():
        where = f"data.tasks.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            problems.append(f"{where}: a task name may use letters, digits, _ and - only (it prefixes each text "
                            f"as '{name}: ' and namespaces each label as '{name}/<label>')")
        for key in spec:
            if key not in TASK_KEYS:
                close = difflib.get_close_matches(key, TASK_KEYS, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where}.{key}: unknown key{hint}; a task takes {', '.join(TASK_KEYS)}")
        if not spec.get("train"):
            problems.append(f"{where}.train: required (a data file or a packaged alias such as pang-lee-sentences)")
        problems += [p for key in ("train", "eval") if spec.get(key)
                     for p in check_data_ref(spec[key], f"{where}.{key}", check_paths)]
    return problems
