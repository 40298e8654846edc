"""Multi-task classification: two tasks' data in one labelled set, per-task metrics, validation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from deltatune.configure import load_config
from deltatune.tasks import prepare_rows
from deltatune.errors import ConfigError, DataError
from deltatune.metrics import multitask_metrics, task_groups
from tests.conftest import FILLER, sentiment_rows, write_csv
from tests.helpers import QUICK


def answer_rows(n: int, seed: int = 1) -> list[dict]:
    """The second task: 'yes' or 'no' among filler words, labelled positive / negative, the same label
    names as the sentiment task's, so the namespaces must keep them apart."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 5) + ["yes" if label == "positive" else "no"]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "answer": label})
    return rows


def tasks_config(tmp_path, model, *extra: str, sentiment=None, answer=None):
    s = write_csv(tmp_path / "sentiment.csv", sentiment or sentiment_rows(60))
    a = write_csv(tmp_path / "answer.csv", answer or answer_rows(40))
    return load_config(None, [f"model={model}", "task=classification", "method.name=full", *QUICK,
                              f"output_dir={tmp_path / 'run'}", f"data.tasks.sentiment.train={s}",
                              f"data.tasks.answer.train={a}", "data.tasks.answer.text_column=sentence",
                              "data.tasks.answer.label_column=answer", *extra])


def test_rows_are_prefixed_namespaced_and_counted_per_task(tmp_path, tiny_bert):
    cfg = tasks_config(tmp_path, tiny_bert, "data.eval_fraction=0.25", "data.train_limit=30")
    prepared = prepare_rows(cfg)
    report, splits = prepared.report, prepared.splits
    for split, rows in splits.items():
        for row in rows:
            task, _, label = row["label"].partition("/")
            assert row["text"].startswith(f"{task}: ") and label in ("positive", "negative")
        for task, section in report["tasks"].items():
            assert sum(r["label"].startswith(task + "/") for r in rows) == section["rows_per_split"][split]
    # Split and limits per task, stratified: 60 sentiment rows -> 2 x round(7.5) = 16 eval, 44 train cut to
    # 30; 40 answer rows -> 10 eval, 30 train.
    assert report["tasks"]["sentiment"]["rows_per_split"] == {"train": 30, "eval": 16, "test": 0}
    assert report["tasks"]["answer"]["rows_per_split"] == {"train": 30, "eval": 10, "test": 0}
    assert report["rows_per_split"] == {"train": 60, "eval": 26, "test": 0}
    # "positive" in both tasks: two classes, each task's balance kept.
    assert report["label_counts"]["train"] == {"answer/negative": 15, "answer/positive": 15,
                                               "sentiment/negative": 15, "sentiment/positive": 15}
    assert report["rows_in"] == 100 == sum(t["rows_in"] for t in report["tasks"].values())
    assert report["left_out_by_limits"] == 14


def test_dedup_and_leakage_checks_run_per_task(tmp_path, tiny_bert):
    sentiment = sentiment_rows(40)
    shared = sentiment[0]["text"]
    answer = answer_rows(40)
    answer[1]["sentence"] = shared  # the same sentence in another task is not a duplicate of it
    answer[3]["sentence"] = answer[5]["sentence"] = answer[7]["sentence"] = "the film yes a movie"
    eval_rows = [{"sentence": answer[9]["sentence"], "answer": answer[9]["answer"]},  # leaks from answer's train
                 {"sentence": sentiment[2]["text"], "answer": "negative"},  # in sentiment's train: no leak here
                 {"sentence": "the plot no the story", "answer": "negative"}]
    eval_path = write_csv(tmp_path / "answer-eval.csv", eval_rows)
    cfg = tasks_config(tmp_path, tiny_bert, f"data.tasks.answer.eval={eval_path}", "data.dedup.leakage=remove",
                       sentiment=sentiment, answer=answer)
    report = prepare_rows(cfg).report
    assert report["tasks"]["answer"]["exact_duplicates_removed"] == 2
    assert report["tasks"]["sentiment"]["exact_duplicates_removed"] == 0
    assert report["tasks"]["answer"]["leakage_found"]["eval"] == {"exact": 1}
    assert report["tasks"]["answer"]["leakage_removed"] == 1 == report["leakage_removed"]
    assert report["tasks"]["answer"]["rows_per_split"] == {"train": 38, "eval": 2, "test": 0}
    assert report["exact_duplicates_removed"] == 2


def test_task_groups_only_for_namespaced_labels():
    assert task_groups(["negative", "positive"]) is None
    assert task_groups(["a/x", "a/y"]) is None  # one task
    assert task_groups(["a/x", "a/y", "b/x"]) is None  # a task with a single label
    assert task_groups(["a/x", "a/y", "b/x", "b/y/z"]) == {"a": [0, 1], "b": [2, 3]}


def test_metrics_equal_sklearn_on_the_masked_predictions():
    labels = ["ans/negative", "ans/positive", "mood/angry", "mood/calm", "mood/sad", "sentiment/positive",
              "sentiment/negative"]
    groups = {"ans": [0, 1], "mood": [2, 3, 4], "sentiment": [5, 6]}
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, len(labels), 300)
    logits = rng.normal(size=(300, len(labels)))
    result = multitask_metrics(y_true.tolist(), logits, labels)
    assert (logits.argmax(1) != result_predictions(logits, y_true, groups)).sum() > 100  # masking matters here
    for task, idx in groups.items():
        rows = np.isin(y_true, idx)
        true = np.searchsorted(idx, y_true[rows])  # index within the task
        pred = logits[rows][:, idx].argmax(1)  # the argmax over the task's own labels
        ours = result["tasks"][task]
        assert ours["support"] == rows.sum()
        assert ours["labels"] == [labels[i].split("/", 1)[1] for i in idx]
        assert ours["accuracy"] == pytest.approx(accuracy_score(true, pred))
        assert result[f"accuracy/{task}"] == ours["accuracy"]
        k = list(range(len(idx)))
        assert ours["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro", labels=k, zero_division=0))
        assert result[f"macro_f1/{task}"] == ours["macro_f1"]
        p, r, f, s = precision_recall_fscore_support(true, pred, labels=k, zero_division=0)
        for j, name in enumerate(ours["labels"]):
            got = [ours["per_class"][name][m] for m in ("precision", "recall", "f1", "support")]
            assert got == pytest.approx([p[j], r[j], f[j], s[j]])
        assert ours["confusion_matrix"] == confusion_matrix(true, pred, labels=k).tolist()
    assert result["task_mean_accuracy"] == pytest.approx(np.mean([result["tasks"][t]["accuracy"] for t in groups]))
    assert result["task_mean_macro_f1"] == pytest.approx(np.mean([result["tasks"][t]["macro_f1"] for t in groups]))
    masked = result_predictions(logits, y_true, groups)
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, masked))
    m, task_of = np.array(result["confusion_matrix"]), {i: t for t, idx in groups.items() for i in idx}
    assert all(m[i, j] == 0 for i in task_of for j in task_of if task_of[i] != task_of[j])  # never another task's


def result_predictions(logits, y_true, groups) -> np.ndarray:
    """Reference masked argmax, written independently of the implementation."""
    task_of = {i: t for t, idx in groups.items() for i in idx}
    return np.array([max(groups[task_of[y]], key=lambda j: row[j]) for row, y in zip(logits, y_true)])


@pytest.mark.parametrize("override, expected", [
    ("data.tasks.answer.trian=x.csv", "data.tasks.answer.trian: unknown key (did you mean 'train'?)"),
    ("data.tasks.answer.train=missing.csv", "data.tasks.answer.train: file missing.csv does not exist"),
    ("data.tasks.answer.train=answers.txt", "data.tasks.answer.train: 'answers.txt' is neither a packaged data set"),
    ("data.tasks.sent/iment.train=pang-lee-sentences", "data.tasks.sent/iment: a task name may use letters"),
    ("data.train=pang-lee-sentences", "data.train: leave it unset with data.tasks"),
    ("task=causal_lm", "data.tasks: multi-task training is for task classification, not 'causal_lm'"),
])
def test_validation_names_the_task_and_key(tmp_path, tiny_bert, override, expected):
    with pytest.raises(ConfigError) as err:
        tasks_config(tmp_path, tiny_bert, override)
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_validation_needs_two_tasks_with_train_files(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.tasks.sentiment.eval=pang-lee-sentences"])
    assert "data.tasks.sentiment.train: required (a data file or a packaged alias such as pang-lee-sentences)" \
        in err.value.problems
    assert any(p.startswith("data.tasks: multi-task training needs at least two tasks, got 1 (sentiment)")
               for p in err.value.problems)


def test_a_task_with_one_class_is_refused_by_name(tmp_path, tiny_bert):
    answer = [{**r, "answer": "positive"} for r in answer_rows(20)]
    with pytest.raises(DataError, match=r"data.tasks.answer: .*answer.csv: column 'answer' has 1 class\(es\) "
                                        r"\('positive'\)"):
        prepare_rows(tasks_config(tmp_path, tiny_bert, answer=answer))


def test_training_reports_metrics_per_task(tmp_path, tiny_bert):
    """End to end: metrics.json and the eval log carry each task's metrics, and they equal sklearn's on
    the trained model's own predictions, masked to each example's task."""
    from deltatune.tasks import prepare
    from deltatune.tasks.common import forward
    from deltatune.inference import load_run
    from deltatune.train.run import train

    cfg = tasks_config(tmp_path, tiny_bert, "train.epochs=8", "train.lr=5e-3")
    run = train(cfg)
    metrics = json.loads((run.path / "metrics.json").read_text())["eval"]
    assert set(metrics["tasks"]) == {"sentiment", "answer"}
    log = [json.loads(line)["eval"] for line in (run.path / "log.jsonl").read_text().splitlines() if '"eval"' in line]
    assert log and all({"accuracy/sentiment", "macro_f1/answer", "task_mean_accuracy"} <= set(e) for e in log)

    loaded = load_run(run.path)
    data = prepare(cfg, loaded.tokenizer)
    logits, order = [], []
    with torch.no_grad():
        for batch, index in loaded.task.batches(data.eval.examples):
            logits.append(forward(loaded.model.eval(), batch["inputs"], batch["targets"]))
            order += index
    logits = torch.cat(logits).numpy()
    rows = [data.eval.rows[i] for i in order]
    for task in ("sentiment", "answer"):
        mine = [i for i, r in enumerate(rows) if r["label"].startswith(task + "/")]
        idx = [j for j, name in enumerate(loaded.labels) if name.startswith(task + "/")]
        true = [idx.index(loaded.labels.index(rows[i]["label"])) for i in mine]
        pred = logits[mine][:, idx].argmax(1)
        assert metrics["tasks"][task]["accuracy"] == pytest.approx(accuracy_score(true, pred))
        assert metrics["tasks"][task]["macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"))
        assert metrics["tasks"][task]["support"] == len(mine)
    baseline = json.loads((run.path / "metrics.json").read_text())["baseline"]
    assert metrics["task_mean_accuracy"] > baseline["task_mean_accuracy"] and metrics["loss"] < baseline["loss"]


def test_the_multitask_loss_is_a_softmax_over_each_examples_own_task():
    from deltatune.eval.evaluate import task_for

    def loss_fn(task, labels):
        return task_for(task, labels=labels).logits_loss

    labels = ["a/x", "a/y", "b/p", "b/q", "b/r"]
    logits = torch.randn(6, 5, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    loss, count = loss_fn("classification", labels)(logits, targets)
    by_hand = sum(-torch.log_softmax(logits[i, cols], -1)[cols.index(int(y))]
                  for i, y in enumerate(targets) for cols in [[0, 1] if y < 2 else [2, 3, 4]])
    assert count == 6 and torch.allclose(loss.double(), by_hand, atol=1e-5)
    plain, _ = loss_fn("classification", ["x", "y", "p", "q", "r"])(logits, targets)  # single task: whole softmax
    assert torch.allclose(plain.double(), torch.nn.functional.cross_entropy(logits, targets, reduction="sum"), atol=1e-5)
    assert plain > loss  # the other task's classes add to every denominator
