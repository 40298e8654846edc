"""Entity-level metrics for BIO (IOB2) tags against seqeval's own numbers, strict mode."""

import random
import warnings

import pytest

from deltatune.metrics import entities, entity_metrics, is_iob2

seqeval = pytest.importorskip("seqeval.metrics")
from seqeval.scheme import IOB2  # noqa: E402

HAND_TRUE = [["B-PER", "I-PER", "O", "B-LOC"],
             ["O", "B-ORG", "I-ORG", "I-ORG", "O"],
             ["B-LOC", "B-LOC", "O", "B-PER"],
             ["O", "O", "O"]]
HAND_PRED = [["B-PER", "I-PER", "O", "I-LOC"],      # a stray I-LOC: no entity in strict mode
             ["O", "B-ORG", "I-ORG", "O", "O"],       # ends one token early: wrong
             ["B-LOC", "I-LOC", "O", "B-PER"],        # two entities merged into one: both wrong
             ["B-MISC", "I-PER", "O"]]                # a type the truth never has, then a stray I-PER


def seqeval_figures(true, pred) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-division warnings for types with no prediction
        kw = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
        report = seqeval.classification_report(true, pred, output_dict=True, **kw)
        return {"entity_precision": seqeval.precision_score(true, pred, **kw),
                "entity_recall": seqeval.recall_score(true, pred, **kw),
                "entity_f1": seqeval.f1_score(true, pred, **kw),
                "entity_macro_f1": report["macro avg"]["f1-score"],
                "entity_per_type": {k: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"],
                                        "support": v["support"]}
                                    for k, v in report.items() if not k.endswith(" avg")}}


def assert_same(ours: dict, theirs: dict) -> None:
    for key in ("entity_precision", "entity_recall", "entity_f1", "entity_macro_f1"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    assert set(ours["entity_per_type"]) == set(theirs["entity_per_type"])
    for kind, figures in theirs["entity_per_type"].items():
        for name, value in figures.items():
            assert ours["entity_per_type"][kind][name] == pytest.approx(value, abs=1e-12), (kind, name)


def test_strict_entities_of_one_sentence():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entities(["I-PER", "I-PER", "B-LOC", "I-PER"]) == {("LOC", 2, 3)}
    assert entities(["B-LOC", "B-LOC"]) == {("LOC", 0, 1), ("LOC", 1, 2)}


def test_hand_made_set_matches_seqeval():
    ours = entity_metrics(HAND_TRUE, HAND_PRED)
    assert_same(ours, seqeval_figures(HAND_TRUE, HAND_PRED))
    # predicted: PER and PER right; ORG (short), LOC (merged) and MISC wrong. True: 6 entities.
    assert (ours["entity_precision"], ours["entity_recall"]) == (pytest.approx(2 / 5), pytest.approx(2 / 6))
    assert ours["entity_per_type"]["MISC"]["support"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_generated_sets_match_seqeval(seed):
    rng = random.Random(seed)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]

    def sentence(n):
        return [rng.choice(tags) for _ in range(n)]

    true = [sentence(rng.randint(1, 12)) for _ in range(rng.randint(1, 30))]
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in s] for s in true]
    if not any(entities(s) for s in true + pred):
        pred[0][0] = "B-PER"
    assert_same(entity_metrics(true, pred), seqeval_figures(true, pred))


def test_which_tag_sets_are_iob2():
    assert is_iob2(["O", "B-PER", "I-PER"]) and is_iob2(["B-X"])
    assert not is_iob2(["NN", "VBZ", "O"]) and not is_iob2(["O", "I-PER"]) and not is_iob2(["O", "B-"])
