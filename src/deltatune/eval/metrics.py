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


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token negative log-likelihood (inf past float range)."""
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")
