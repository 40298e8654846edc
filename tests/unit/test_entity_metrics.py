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


def bio_rows(n: int) -> list[dict]:
    from tests.conftest import tagged_rows

    rows = []
    for row in tagged_rows(n):
        tags, previous = [], "O"
        for tag in row["tags"]:
            tags.append("O" if tag == "O" else f"{'I' if previous == tag else 'B'}-{tag}")
            previous = tag
        rows.append({"tokens": row["tokens"], "tags": tags})
    return rows


def test_a_bio_tagger_reports_entity_figures_that_seqeval_confirms(tiny_bert, tmp_path, capsys):
    import json

    from deltatune.cli import main
    from tests.conftest import write_jsonl
    from tests.helpers import QUICK

    data = write_jsonl(tmp_path / "bio.jsonl", bio_rows(64))
    run = tmp_path / "run"
    assert main(["train", f"model={tiny_bert}", "task=token_classification", f"data.train={data}", *QUICK,
                 "method.name=lora", "train.epochs=2", "train.lr=1e-2", f"output_dir={run}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())["eval"]
    assert {"entity_precision", "entity_recall", "entity_f1", "entity_macro_f1"} <= set(metrics)
    assert set(metrics["entity_per_type"]) <= {"POS", "NEG"}
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    evaluated = json.loads(capsys.readouterr().out)["eval"]
    assert main(["predict", str(run), "--input", str(data)]) == 0
    predicted = [json.loads(line)["tags"] for line in capsys.readouterr().out.splitlines()]
    true = [json.loads(line)["tags"] for line in data.read_text().splitlines()]
    assert_same({k: v for k, v in evaluated.items() if k.startswith("entity_")}, seqeval_figures(true, predicted))
