"""Classification and language-model metrics, computed from predictions with plain numpy.

Checked against scikit-learn in tests/unit/test_metrics.py.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(y_true: list[int], y_pred: list[int], n_classes: int) -> np.ndarray:
    """``m[i, j]`` counts examples of true class i predicted as j."""
    index = np.asarray(y_true) * n_classes + np.asarray(y_pred)
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(y_true: list[int], y_pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support (0 where undefined, as sklearn)."""
    m = confusion_matrix(y_true, y_pred, len(labels))
    tp = np.diag(m).astype(float)
    predicted, support = m.sum(0), m.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(labels, precision, recall, f1, support)}
    return {
        "accuracy": float(tp.sum() / max(m.sum(), 1)),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": m.tolist(),
    }


# ----------------------------------------------------------------------------- entities (BIO / IOB2 tags)

def is_iob2(labels: list[str]) -> bool:
    """Tags of the IOB2 scheme: ``O`` and ``B-TYPE`` / ``I-TYPE``, with at least one ``B-``."""
    return any(t.startswith("B-") for t in labels) and all(t == "O" or t[:2] in ("B-", "I-") and t[2:]
                                                            for t in labels)


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) of each entity in one IOB2 sentence, as seqeval's strict mode reads them: a
    ``B-X`` starts one and the ``I-X`` right after it continue it; an ``I-X`` that continues no ``X``
    starts nothing (the default, lenient mode would count it as an entity)."""
    found, start, kind = set(), None, ""
    for i, tag in enumerate([*tags, "O"]):
        if start is not None and tag == f"I-{kind}":
            continue
        if start is not None:
            found.add((kind, start, i))
            start = None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return found


def entity_metrics(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 (micro over all entities, and macro over types) and per
    type, with an entity right only when its type and both ends are (seqeval, strict mode, IOB2)."""
    true = {(n, *e) for n, tags in enumerate(true_tags) for e in entities(tags)}
    pred = {(n, *e) for n, tags in enumerate(pred_tags) for e in entities(tags)}

    def scores(t: set, p: set) -> dict:
        hit = len(t & p)
        precision, recall = hit / len(p) if p else 0.0, hit / len(t) if t else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": precision, "recall": recall, "f1": f1, "support": len(t)}

    kinds = sorted({e[1] for e in true | pred})
    per_type = {k: scores({e for e in true if e[1] == k}, {e for e in pred if e[1] == k}) for k in kinds}
    micro = scores(true, pred)
    return {"entity_precision": micro["precision"], "entity_recall": micro["recall"], "entity_f1": micro["f1"],
            "entity_macro_f1": sum(v["f1"] for v in per_type.values()) / len(kinds) if kinds else 0.0,
            "entity_per_type": per_type}


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token negative log-likelihood (inf past float range)."""
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


# ----------------------------------------------------------------------------- multi-task classification

TASK_SEPARATOR = "/"  # multi-task labels are "<task>/<label>" (data/multitask.py names them)


def task_groups(labels: list[str]) -> dict[str, list[int]] | None:
    """Label indices per task when ``labels`` are namespaced ``<task>/<label>`` for two or more
    tasks of at least two labels each; None for ordinary (single-task) labels."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        task, sep, rest = name.partition(TASK_SEPARATOR)
        if not (task and sep and rest):
            return None
        groups.setdefault(task, []).append(i)
    if len(groups) < 2 or any(len(g) < 2 for g in groups.values()):
        return None
    return groups


def same_task(labels: list[str]) -> np.ndarray:
    """``m[i, j]`` is True when labels i and j belong to the same task: row ``m[y]`` is the set of
    classes an example of true class y may be predicted as (and, for a masked loss, normalised over)."""
    groups = task_groups(labels)
    if groups is None:
        raise ValueError(f"labels are not namespaced <task>/<label> for two or more tasks: {labels}")
    task_of = np.empty(len(labels), dtype=int)
    for t, indices in enumerate(groups.values()):
        task_of[indices] = t
    return task_of[:, None] == task_of[None, :]


def multitask_metrics(y_true: list[int], logits, labels: list[str]) -> dict:
    """Metrics of one model trained on several tasks with a shared head over namespaced labels.

    Each example's task is that of its true label, and its prediction is the argmax over that
    task's labels only (the other tasks' logits are masked out), as a model with one head per task
    would predict. Returns ``classification_metrics`` over all labels on those predictions, plus per
    task (``tasks``: accuracy, macro-F1, per-class P/R/F1 and the confusion matrix over the task's
    own labels), flat ``accuracy/<task>`` and ``macro_f1/<task>`` scalars for the eval log, and the
    unweighted means over tasks ``task_mean_accuracy`` / ``task_mean_macro_f1``.
    """
    y_true = np.asarray(y_true, dtype=int)
    scores = np.asarray(logits, dtype=float).reshape(len(y_true), len(labels))
    allowed = same_task(labels)
    y_pred = np.where(allowed[y_true], scores, -np.inf).argmax(-1)
    out = classification_metrics(y_true.tolist(), y_pred.tolist(), labels)
    tasks = {}
    for task, indices in task_groups(labels).items():
        rows = np.isin(y_true, indices)
        if not rows.any():
            continue
        local = {g: i for i, g in enumerate(indices)}
        names = [labels[i].partition(TASK_SEPARATOR)[2] for i in indices]
        tasks[task] = {**classification_metrics([local[y] for y in y_true[rows]], [local[y] for y in y_pred[rows]],
                                                names),
                       "labels": names, "support": int(rows.sum())}
    for task, m in tasks.items():
        out[f"accuracy/{task}"], out[f"macro_f1/{task}"] = m["accuracy"], m["macro_f1"]
    out["task_mean_accuracy"] = float(np.mean([m["accuracy"] for m in tasks.values()]))
    out["task_mean_macro_f1"] = float(np.mean([m["macro_f1"] for m in tasks.values()]))
    out["tasks"] = tasks
    return out


# ----------------------------------------------------------------------------- per-example outcomes, bootstrap
# A run's main metric as a ratio of sums over its evaluation examples: accuracy = correct / examples,
# token accuracy = correct tokens / tokens, perplexity = exp(loss summed / tokens). Kept per example (in the
# examples' order), it can be recomputed on any resample of them: confidence intervals, and paired
# comparisons of two runs evaluated on the same examples.

TRANSFORMS = {"identity": lambda x: x, "exp": np.exp}


def outcome_record(metric: str, transform: str, index: list[int], numerator: list[float],
                   denominator: list[float]) -> dict:
    """What ``eval_outcomes.json`` holds: per example (put back in the examples' order by ``index``, the
    position of each value), the numerator and denominator of ``metric``."""
    order = np.argsort(np.asarray(index), kind="stable")
    return {"metric": metric, "transform": transform,
            "numerator": np.asarray(numerator, dtype=float)[order].tolist(),
            "denominator": np.asarray(denominator, dtype=float)[order].tolist()}


def metric_on(outcomes: dict, rows: np.ndarray | None = None) -> np.ndarray:
    """The metric on the examples ``rows`` (one resample per row of a 2-D array; all examples if None)."""
    num, den = np.asarray(outcomes["numerator"]), np.asarray(outcomes["denominator"])
    if rows is None:
        return TRANSFORMS[outcomes["transform"]](num.sum() / max(den.sum(), 1e-12))
    return TRANSFORMS[outcomes["transform"]](num[rows].sum(-1) / np.maximum(den[rows].sum(-1), 1e-12))


def bootstrap_rows(n: int, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``(resamples, n)`` example indices drawn with replacement: the same draws serve every run compared."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap ``values``."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> dict:
    """``a - b`` over the same bootstrap resamples (paired: both were evaluated on the same examples): its
    interval and a two-sided p-value: twice the share of resamples on the far side of zero, counted as
    (k + 1) / (resamples + 1) (Davison & Hinkley 1997), so that it is never 0, at most 1."""
    diff = np.asarray(a) - np.asarray(b)
    low, high = interval(diff, level)
    far = min(int((diff <= 0).sum()), int((diff >= 0).sum()))
    p = min(1.0, 2 * (far + 1) / (len(diff) + 1))
    return {"low": low, "high": high, "p": p, "significant": bool(low > 0 or high < 0)}
