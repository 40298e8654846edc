import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from deltatune.metrics import classification_metrics, perplexity


@pytest.mark.parametrize("seed,n_classes", [(0, 2), (1, 3), (2, 5)])
def test_classification_metrics_match_scikit_learn(seed, n_classes):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, n_classes, 200).tolist()
    y_pred = rng.integers(0, n_classes - 1, 200).tolist()  # the last class is never predicted
    labels = [f"c{i}" for i in range(n_classes)]
    ours = classification_metrics(y_true, y_pred, labels)
    idx = list(range(n_classes))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert ours["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=idx, average="macro", zero_division=0))
    assert ours["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=idx).tolist()
    for i, name in enumerate(labels):
        got = ours["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))


def test_perplexity_is_exp_of_mean_loss():
    assert perplexity(np.log(20.0)) == pytest.approx(20.0)
    assert perplexity(1e4) == float("inf")
