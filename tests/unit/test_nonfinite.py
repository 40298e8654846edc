"""Numeric guards: a NaN/inf loss or gradient never ends in a completed run with NaN metrics."""

import json

import pytest

from deltatune.cli import main
from deltatune.tasks.classification import Classification
from tests.helpers import QUICK

# batch 8: 7 steps an epoch; evaluation and checkpoint every 2 steps.
SHORT = [*QUICK, "method.name=full", "train.epochs=1", "train.eval_every=2", "train.save_every=2"]


def _train(capsys, model, data, out, *extra):
    code = main(["train", *SHORT, f"model={model}", f"data.train={data}", f"output_dir={out}", *extra])
    return code, capsys.readouterr().err


@pytest.fixture
def nan_at_call(monkeypatch):
    """The classification loss returns NaN at its N-th call (counting from 1)."""
    def poison(n):
        calls = {"n": 0}
        real = Classification.loss

        def loss(self, model, batch):
            calls["n"] += 1
            value, count = real(self, model, batch)
            return (value * float("nan"), count) if calls["n"] == n else (value, count)
        monkeypatch.setattr(Classification, "loss", loss)
    return poison


def test_an_absurd_learning_rate_is_refused_before_the_run(tiny_bert, cls_csv, tmp_path, capsys):
    code, err = _train(capsys, tiny_bert, cls_csv, tmp_path / "r", "train.lr=1e30")
    assert code == 2 and "train.lr: 1e+30 is far too large" in err, err
    assert not (tmp_path / "r").exists()


def test_nan_loss_stops_at_its_step_keeping_checkpoint_and_best(tiny_bert, cls_csv, tmp_path, capsys, nan_at_call):
    nan_at_call(4)  # the 4th micro-batch: step 4, after the checkpoint and best delta of step 2
    code, err = _train(capsys, tiny_bert, cls_csv, tmp_path / "r")
    assert code == 2
    assert "the training loss is nan at step 4" in err, err
    assert "best delta so far (best/) and last checkpoint are kept" in err, err
    run = tmp_path / "r"
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    assert (run / "best").is_dir() and (run / "checkpoint" / "state.json").is_file()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["loop"]["step"] == 2


def test_skip_leaves_the_weights_alone_for_that_step_and_counts_it(tiny_bert, cls_csv, tmp_path, capsys, nan_at_call):
    nan_at_call(3)
    code, err = _train(capsys, tiny_bert, cls_csv, tmp_path / "r", "train.on_nonfinite=skip")
    assert code == 0, err
    run = tmp_path / "r"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["nonfinite_steps_skipped"] == 1
    assert all(v == v for v in metrics["eval"].values() if isinstance(v, float))  # no NaN
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    skipped = [r.get("skipped", 0) for r in log if "loss" in r]
    assert skipped[:3] == [0, 0, 1] and set(skipped[3:]) == {1}, skipped


def test_nonfinite_setting_is_checked(tiny_bert, cls_csv, tmp_path, capsys):
    code, err = _train(capsys, tiny_bert, cls_csv, tmp_path / "r", "train.on_nonfinite=ignore")
    assert code == 2 and "train.on_nonfinite: use fail or skip" in err
    assert not (tmp_path / "r").exists()
