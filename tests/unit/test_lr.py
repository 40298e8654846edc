"""The learning rate a run trains at: each method's default when train.lr is unset, an explicit value
when given, and ``train.lr: auto`` (the range test, train/lr_find.py), which must leave the run exact."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.configure import AUTO, NOT_SEARCHED
from deltatune.errors import ConfigError
from deltatune.methods import registry
from deltatune.methods.base import Method
from deltatune.rundir import RunDir
from deltatune.train import lr_find
from deltatune.train.run import build_job, resume, train
from tests.conftest import sentiment_rows, write_csv
from tests.helpers import config

BUILT_IN = [n for n in registry.names() if not n.startswith("toy")]
ONE_EPOCH = ["train.epochs=1", "train.warmup_ratio=0"]


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_method_has_its_own_default_and_an_explicit_lr_wins(name, tiny_bert, cls_csv):
    method = registry.get(name)
    assert method.default_lr != Method.default_lr or name == "freeze"  # freeze keeps BERT's top, 5e-5
    assert method.default_lr_source != Method.default_lr_source and any(c.isdigit() for c in method.default_lr_source)
    cfg = config(tiny_bert, "classification", name, cls_csv)
    assert cfg.train.lr == method.default_lr
    assert cfg.train.lr_source.startswith("not used" if method.fits_directly(cfg.method.options) else
                                          f"default of {name}: {method.default_lr:g}")
    explicit = config(tiny_bert, "classification", name, cls_csv, None, "train.lr=1.5e-3")
    assert (explicit.train.lr, explicit.train.lr_source) == (1.5e-3, "config")


def test_defaults_follow_the_literature_order():
    lr = {n: registry.get(n).default_lr for n in BUILT_IN}
    assert lr["full"] < lr["lora"] < lr["ia3"] < lr["prompt"]
    assert lr["full"] <= 5e-5 and 1e-4 <= lr["lora"] <= 1e-3 and lr["prompt"] >= 0.1


def test_validate_shows_the_rate_used_and_where_it_came_from(tiny_bert, cls_csv, capsys):
    assert main(["validate", f"model={tiny_bert}", f"data.train={cls_csv}", "method.name=full"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 2.0e-05\n" in out and "lr_source: 'default of full: 2e-05 (Devlin et al. 2019" in out
    assert main(["validate", "--explain"]) == 0
    assert "train.lr  (unset, method.name=prompt) = 0.3\n    Lester et al. 2021" in capsys.readouterr().out


@pytest.mark.parametrize("bad,message", [
    ("train.lr=-1", "train.lr: must be greater than 0, got -1.0"),
    ("train.lr=0", "train.lr: must be greater than 0, got 0.0"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'; or use auto"),
    ("train.lr=[1e-3]", "train.lr: expected a number, got ['1e-3']; or use auto"),
])
def test_bad_rates_are_refused_with_the_key_and_what_to_use(bad, message, tiny_bert, cls_csv):
    with pytest.raises(ConfigError) as err:
        config(tiny_bert, "classification", "lora", cls_csv, None, bad)
    assert message in str(err.value)


def test_auto_is_refused_where_the_task_samples_its_own_data(tiny_llama, qa_jsonl):
    with pytest.raises(ConfigError, match="train.lr: auto runs its range test on the loop over fixed examples"):
        config(tiny_llama, "ppo", "lora", qa_jsonl, None, "train.lr=auto")


def test_a_method_that_fits_directly_says_so_instead_of_searching(tiny_bert, cls_csv, capsys):
    cfg = config(tiny_bert, "classification", "feature_extraction", cls_csv, None, "train.lr=auto")
    assert isinstance(cfg.train.lr, float) and cfg.train.lr_source.startswith(NOT_SEARCHED)
    assert "warning: train.lr: auto, not searched: feature_extraction" in capsys.readouterr().err


def test_a_run_records_the_default_it_trained_at(tiny_bert, cls_csv, tmp_path):
    run = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run", "train.max_steps=2"))
    saved = (run.path / "config.yaml").read_text()
    assert "  lr: 0.0005\n" in saved and "lr_source: 'default of lora: 0.0005" in saved
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["lr"] == 5e-4 and metrics["lr_source"].startswith("default of lora") and "lr_found" not in metrics


def test_the_range_test_saves_its_curve_and_leaves_the_model_and_rngs_as_they_were(tiny_bert, cls_csv, tmp_path):
    job, _, _ = build_job(config(tiny_bert, "classification", "lora", cls_csv, None, "train.lr=auto"), None)
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    before = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    rng = torch.get_rng_state()
    found = lr_find.settle_lr(job, job.run)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, p in job.model.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name
    assert job.train.lr == found["lr"] and lr_find.LOW <= found["lr"] <= lr_find.HIGH
    saved = json.loads((job.run.path / "lr_find.json").read_text())
    assert saved["lr"] == found["lr"] and len(saved["points"]) == saved["steps"] > 10
    assert all({"lr", "loss", "smoothed"} <= set(p) for p in saved["points"])
    svg = (job.run.path / "lr_find.svg").read_text()
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert all(text in svg for text in ("Learning-rate range test: lora", "learning rate (log scale)",
                                        "training loss", "chosen", "1e-7"))


def test_the_range_test_keeps_loraplus_ratio_between_its_groups(tiny_bert, cls_csv, monkeypatch):
    job, _, _ = build_job(config(tiny_bert, "classification", "lora", cls_csv, None, "train.lr=auto",
                                 "method.loraplus_lr_ratio=16"), None)
    seen = []
    step = torch.optim.AdamW.step

    def record(self, *args, **kwargs):
        seen.append({g["lr"] for g in self.param_groups if g["params"]})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    lr_find._sweep(job, [1e-4, 1e-3])
    assert [sorted(rates) for rates in seen] == [[1e-4, 1.6e-3], [1e-3, 1.6e-2]]


def _delta(run) -> dict:
    return load_file(run.delta / "adapter_model.safetensors")


def test_auto_runs_are_reproducible_equal_an_explicit_run_at_the_pick_and_resume_without_searching(
        tiny_bert, cls_csv, tmp_path, monkeypatch):
    auto = ["train.lr=auto", "train.epochs=2", "train.save_every=2", *ONE_EPOCH[1:]]
    a = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "a", *auto))
    b = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "b", *auto))
    found = json.loads((a.path / "lr_find.json").read_text())["lr"]
    assert found > 1e-5  # a rate that moves the weights, so equal deltas below mean something
    explicit = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "c",
                            *[o for o in auto if o != "train.lr=auto"], f"train.lr={found!r}"))
    for other in (b, explicit):
        assert all(torch.equal(v, _delta(other)[k]) for k, v in _delta(a).items())
    metrics = json.loads((a.path / "metrics.json").read_text())
    assert metrics["lr_found"] == metrics["lr"] == found and metrics["lr_source"] == AUTO
    assert yaml.safe_load((a.path / "config.yaml").read_text())["train"]["lr"] == found

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "d", *auto), callbacks=(interrupt,))

    def no_second_search(job):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(lr_find, "range_test", no_second_search)
    resumed = resume(tmp_path / "d")
    assert all(torch.equal(v, _delta(resumed)[k]) for k, v in _delta(a).items())
    assert json.loads((resumed.path / "metrics.json").read_text())["lr_found"] == found


def test_the_pick_trains_better_than_a_far_off_rate(tiny_bert, tmp_path):
    """256 rows, 3 epochs: the range test's pick must learn; 1e-7 barely moves the weights."""
    data = write_csv(tmp_path / "s.csv", sentiment_rows(256))
    common = ["train.epochs=3", "train.batch_size=16"]
    picked = train(config(tiny_bert, "classification", "lora", data, tmp_path / "auto", "train.lr=auto", *common))
    far = train(config(tiny_bert, "classification", "lora", data, tmp_path / "far", "train.lr=1e-7", *common))
    picked_loss, far_loss = (json.loads((r.path / "metrics.json").read_text())["eval"]["loss"] for r in (picked, far))
    assert picked_loss < far_loss - 0.05, (picked_loss, far_loss)
