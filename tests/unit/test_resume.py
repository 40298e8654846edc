import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.run import resume, train
from tests.helpers import config

COMMON = ["train.epochs=2", "train.grad_accum=2", "train.save_every=2", "train.lr=2e-3"]


def _losses(run_path):
    lines = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-epoch", "epoch-boundary"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_bert, cls_csv, tmp_path, stop_at):
    straight = train(config(tiny_bert, "classification", "full", cls_csv, tmp_path / "a", *COMMON))

    def interrupt(state):
        if state.step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "full", cls_csv, tmp_path / "b", *COMMON), callbacks=(interrupt,))
    broken = tmp_path / "b"
    assert json.loads((broken / "status.json").read_text())["status"] == "interrupted"
    assert not (broken / "metrics.json").exists() and not (broken / "delta").exists()

    resumed = resume(broken)
    a, b = load_file(straight.delta / "model.safetensors"), load_file(resumed.delta / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(straight.path) == _losses(resumed.path)
    metrics_a = json.loads((straight.path / "metrics.json").read_text())
    metrics_b = json.loads((resumed.path / "metrics.json").read_text())
    assert metrics_a["eval"] == metrics_b["eval"] and metrics_a["baseline"] == metrics_b["baseline"]
    assert json.loads((broken / "status.json").read_text())["status"] == "completed"


def test_resume_refuses_changed_data(tiny_bert, cls_csv, tmp_path):
    from deltatune.errors import RunError

    def interrupt(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "r", *COMMON), callbacks=(interrupt,))
    cls_csv.write_text(cls_csv.read_text().replace("great", "fine"))
    with pytest.raises(RunError, match="the data changed"):
        resume(tmp_path / "r")
