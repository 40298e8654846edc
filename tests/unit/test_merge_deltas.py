"""`deltatune merge-deltas`: LoRA deltas of two classification runs combined into one multi-task run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from deltatune import registry_db
from deltatune.cli import main
from deltatune.combine import merge_deltas
from deltatune.errors import ConfigError
from deltatune.inference import load_run
from deltatune.train.run import train
from tests.conftest import FILLER, sentiment_rows, write_csv
from tests.helpers import config

TRAIN = ("train.max_steps=6", "train.lr=3e-2", "train.eval_every=0", "data.eval_fraction=0.25", "method.r=4")


def topic_rows(n: int, seed: int = 1) -> list[dict]:
    """A second task with three classes and its own columns: which of three marker words a text holds."""
    rng = random.Random(seed)
    markers = {"sport": "ball", "money": "bank", "food": "bread"}
    rows = []
    for i in range(n):
        topic = list(markers)[i % 3]
        words = rng.sample(FILLER, 5) + [markers[topic]]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "topic": topic})
    return rows


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("sources")
    sentiment = write_csv(root / "sentiment.csv", sentiment_rows(48))
    topics = write_csv(root / "topics.csv", topic_rows(48))
    a = train(config(tiny_bert, "classification", "lora", sentiment, root / "a", *TRAIN))
    b = train(config(tiny_bert, "classification", "lora", topics, root / "b", *TRAIN, "method.r=2",
                     "data.text_column=sentence", "data.label_column=topic"))
    return a.path, b.path


def updates(run_dir) -> dict[str, torch.Tensor]:
    """Each adapted layer's full update s B A, read from a saved peft adapter."""
    config = json.loads((run_dir / "delta" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(run_dir / "delta" / "adapter_model.safetensors")
    return {k.replace(".lora_A.weight", ""): scale * state[k.replace("lora_A", "lora_B")] @ state[k]
            for k in state if k.endswith("lora_A.weight")}


def test_cat_is_the_exact_weighted_sum_and_heads_keep_their_rows(two_runs, tmp_path):
    a, b = two_runs
    run = merge_deltas([str(a), str(b)], how="cat", weights=[0.7, 1.3], output_dir=str(tmp_path / "m"),
                       progress=False)
    ua, ub, combined = updates(a), updates(b), updates(run.path)
    assert combined.keys() == ua.keys() and ua
    for key in ua:
        torch.testing.assert_close(combined[key], 0.7 * ua[key] + 1.3 * ub[key], atol=1e-6, rtol=1e-5)
    labels = json.loads((run.path / "labels.json").read_text())["labels"]
    assert sorted(labels) == ["sentiment/negative", "sentiment/positive", "topics/food", "topics/money",
                              "topics/sport"]
    heads = {name: load_file(d / "delta" / "adapter_model.safetensors") for name, d in (("sentiment", a),
                                                                                        ("topics", b))}
    own = {name: json.loads((d / "labels.json").read_text())["labels"] for name, d in (("sentiment", a),
                                                                                       ("topics", b))}
    merged = load_file(run.path / "delta" / "adapter_model.safetensors")
    for key in ("base_model.model.classifier.weight", "base_model.model.classifier.bias"):
        for row, label in enumerate(labels):
            task, name = label.split("/")
            assert torch.equal(merged[key][row], heads[task][key][own[task].index(name)])
    config = json.loads((run.path / "delta" / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 and config["lora_alpha"] == 6 and config["modules_to_save"]


def test_linear_at_the_summed_rank_equals_cat_and_at_a_lower_rank_is_the_best_approximation(two_runs, tmp_path):
    a, b = two_runs
    full = merge_deltas([str(a), str(b)], how="linear", rank=6, output_dir=str(tmp_path / "six"), progress=False)
    low = merge_deltas([str(a), str(b)], how="linear", output_dir=str(tmp_path / "four"), progress=False)
    ua, ub = updates(a), updates(b)
    for key, update in updates(full.path).items():
        torch.testing.assert_close(update, ua[key] + ub[key], atol=1e-5, rtol=1e-4)
    for key, update in updates(low.path).items():  # rank 4: the SVD's best rank-4 approximation
        u, s, vh = torch.linalg.svd(ua[key] + ub[key])
        torch.testing.assert_close(update, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=1e-4)


def test_each_task_is_scored_on_its_own_runs_evaluation_rows(two_runs, tmp_path):
    """With the second delta weighted 0 the encoder is the first run's: its task's figures are exactly
    that run's, so the combined run evaluates on the rows that run held out."""
    a, b = two_runs
    run = merge_deltas([str(a), str(b)], how="cat", weights=[1.0, 0.0], output_dir=str(tmp_path / "m"),
                       progress=False)
    metrics = json.loads((run.path / "metrics.json").read_text())
    alone = json.loads((a / "metrics.json").read_text())["eval"]
    task = metrics["eval"]["tasks"]["sentiment"]
    assert task["accuracy"] == alone["accuracy"] and task["macro_f1"] == alone["macro_f1"]
    assert task["confusion_matrix"] == alone["confusion_matrix"]
    assert metrics["merged"]["sources"][0] | {"run": None} == {
        "task": "sentiment", "run": None, "weight": 1.0, "main_metric": "accuracy", "alone": alone["accuracy"],
        "macro_f1_alone": alone["macro_f1"]}
    assert registry_db.list_runs(kind="merge")[0]["path"] == str(run.path)
    loaded = load_run(run.path)  # an ordinary run: the tools load it, predict over every task's labels
    assert loaded.cfg.data.task_prefix is False and len(loaded.labels) == 5


def test_the_command_prints_each_task_alone_and_combined(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert main(["merge-deltas", str(a), str(b), "--how", "ties", "--density", "0.5", "--names", "pos", "topic",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["task", "alone", "combined"]
    assert [line.split()[0] for line in out[1:3]] == ["pos", "topic"] and out[-1] == str(tmp_path / "m")


def test_what_cannot_combine_is_said_all_at_once(two_runs, tmp_path, tiny_bert, cls_csv):
    a, b = two_runs
    with pytest.raises(ConfigError) as caught:
        merge_deltas([str(a), str(b)], how="average", weights=[1.0], density=2.0, progress=False)
    text = str(caught.value)
    assert "--how: 'average' is not a way lora deltas combine; use linear, ties, dare, cat" in text
    assert "--weights: one weight per run (2), got 1" in text
    with pytest.raises(ConfigError, match="at least two runs"):
        merge_deltas([str(a)], progress=False)
    other = train(config(tiny_bert, "classification", "ia3", cls_csv, tmp_path / "ia3", *TRAIN[:4]))
    dora = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "dora", *TRAIN[:4],
                        "method.use_dora=true", "train.seed=7"))
    with pytest.raises(ConfigError) as caught:
        merge_deltas([str(a), str(other.path), str(dora.path)], progress=False)
    text = str(caught.value)
    assert f"{other.path}: trained with ia3, {a} with lora; combine deltas of one method" in text
    assert f"{dora.path}: it is a DoRA delta (method.use_dora)" in text
    assert f"{dora.path}: train.seed differs from the first run's" in text
    assert not (tmp_path / "runs").exists()
