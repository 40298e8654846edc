"""ORPO and SimPO in the one training loop, on the tiny Llama and the learnable preference set of
test_reward_dpo.py (every chosen response ends in a positive word, every rejected one in a negative
word): they train through `deltatune train`, need no reference pass, compute the loss their pure
functions define, and resume bit-exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.errors import ConfigError
from deltatune.inference import evaluate_file, load_run
from deltatune.rlhf.losses import orpo_loss, simpo_loss
from deltatune.rundir import RunDir
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job, train
from tests.conftest import write_jsonl
from tests.helpers import QUICK, config
from tests.unit.test_reward_dpo import hand_logp, preference_rows

LEARN = ["train.epochs=6", "train.lr=3e-2", "train.warmup_ratio=0"]
# orpo.lam=1: with the default 0.1 the SFT term dominates on this toy set (see the lam test below).
SETTINGS = {"orpo": ["orpo.lam=1.0"], "simpo": ["simpo.beta=2.0", "simpo.gamma=1.0"]}


@pytest.fixture
def prefs_jsonl(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(80))


def _train_cli(model, task, data, out, *extra) -> dict:
    argv = ["train", "--quiet", f"model={model}", f"task={task}", "method.name=lora", f"data.train={data}", *QUICK,
            *extra, f"output_dir={out}"]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _losses(run_path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.mark.parametrize("task", ["orpo", "simpo"])
def test_learns_held_out_pairs_end_to_end(task, tiny_llama, prefs_jsonl, tmp_path, capsys):
    metrics = _train_cli(tiny_llama, task, prefs_jsonl, tmp_path / "run", *LEARN, *SETTINGS[task])
    before, after = metrics["baseline"], metrics["eval"]
    assert after["pairs"] == before["pairs"] == 16  # 4 of 20 prompts held out, 4 pairs each
    assert metrics["main_metric"] == {"name": "loss", "maximize": False}
    # Held-out preference accuracy: about chance for the untouched model, then nearly every pair.
    assert before["accuracy"] < 0.6 and after["accuracy"] >= 0.9
    assert after["margin"] > before["margin"] + 0.1
    assert after["loss"] < before["loss"] - 0.05
    assert after["chosen_logp"] - after["rejected_logp"] > before["chosen_logp"] - before["rejected_logp"]
    if task == "orpo":  # the SFT term: the chosen responses got likelier
        assert after["nll"] == pytest.approx(-after["chosen_logp"]) and after["nll"] < before["nll"]
    else:
        assert "nll" not in after
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert len(losses) == metrics["steps"] == 48
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.05  # the training loss falls (last epoch vs first)

    # The run reloads without any reference, on its own data and on another file.
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(40, seed=7))
    again = evaluate_file(load_run(tmp_path / "run"), str(held))
    assert again["pairs"] == 40 and again["accuracy"] >= 0.8
    assert main(["predict", str(tmp_path / "run"), "--text", "what is 3", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["new_tokens"] <= 4


def test_orpo_odds_ratio_term_orders_the_pairs(tiny_llama, prefs_jsonl, tmp_path):
    """lam = 0 is SFT on the chosen responses alone: it learns the positive words too, but the
    odds-ratio term is what pushes the rejected responses down."""
    sft = _train_cli(tiny_llama, "orpo", prefs_jsonl, tmp_path / "sft", *LEARN, "orpo.lam=0")["eval"]
    orpo = _train_cli(tiny_llama, "orpo", prefs_jsonl, tmp_path / "orpo", *LEARN, "orpo.lam=1")["eval"]
    assert sft["loss"] == pytest.approx(sft["nll"])
    assert orpo["margin"] > 2 * sft["margin"] and orpo["rejected_logp"] < sft["rejected_logp"] - 0.05


@pytest.mark.parametrize("task", ["orpo", "simpo"])
def test_no_reference_pass_and_one_forward_per_step(task, tiny_llama, prefs_jsonl, tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.LlamaModel.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counted)
    # plain loss: no chunked-loss self-check forward
    cfg = config(tiny_llama, task, "lora", prefs_jsonl, None, "train.max_steps=4", "train.eval_every=2",
                 "train.chunked_loss=false")
    job, _, _ = build_job(cfg, None)
    assert calls == [] and not job.task.needs_reference  # nothing scored before training
    assert all("reference" not in e for e in job.train_examples + job.eval_examples)
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    run_loop(job)
    eval_batches = math.ceil(len(job.eval_examples) / 16)
    assert calls.count(True) == 4 and calls.count(False) == 2 * eval_batches  # evaluations at steps 2 and 4


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("task", ["orpo", "simpo"])
def test_batch_loss_equals_the_loss_function_of_hand_logps(task, chunked, tiny_llama, prefs_jsonl):
    cfg = config(tiny_llama, task, "lora", prefs_jsonl, None, "orpo.lam=0.7", "simpo.beta=2.5", "simpo.gamma=0.4")
    job, _, _ = build_job(cfg, None)
    model = job.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the base
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    examples = job.train_examples[:5]
    job.task.chunked = chunked
    total, count = job.task.loss(model, job.task.collate(examples))
    with torch.no_grad():
        chosen = torch.stack([hand_logp(model, e["chosen"], average=True) for e in examples])
        rejected = torch.stack([hand_logp(model, e["rejected"], average=True) for e in examples])
    if task == "orpo":  # the SFT term: each chosen response's per-token NLL, the prompt masked
        expected = orpo_loss(chosen, rejected, lam=0.7)[0]
        assert expected.item() != pytest.approx(orpo_loss(chosen, rejected, lam=0.0)[0].item(), abs=1e-3)
    else:
        expected = simpo_loss(chosen, rejected, beta=2.5, gamma=0.4)[0]
    assert count == 5
    torch.testing.assert_close(total.detach() / count, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["orpo", "simpo"])
def test_interrupted_and_resumed_run_equals_uninterrupted(task, tiny_llama, prefs_jsonl, tmp_path):
    common = ["train.epochs=2", "train.grad_accum=2", "train.save_every=2", "train.lr=1e-2", *SETTINGS[task]]
    straight = train(config(tiny_llama, task, "lora", prefs_jsonl, tmp_path / "a", *common))

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_llama, task, "lora", prefs_jsonl, tmp_path / "b", *common), callbacks=(interrupt,))
    assert json.loads((tmp_path / "b" / "status.json").read_text())["status"] == "interrupted"
    assert main(["train", "--quiet", "--resume", str(tmp_path / "b")]) == 0
    resumed = RunDir(tmp_path / "b")
    a, b = (load_file(run.delta / "adapter_model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(straight.path) == _losses(resumed.path)
    metrics_a, metrics_b = (json.loads((run.path / "metrics.json").read_text()) for run in (straight, resumed))
    assert metrics_a["eval"] == metrics_b["eval"] and metrics_a["baseline"] == metrics_b["baseline"]
    assert metrics_a["steps"] == metrics_b["steps"] == 8


def test_settings_are_checked_all_at_once(tiny_llama, prefs_jsonl):
    with pytest.raises(ConfigError) as err:
        config(tiny_llama, "orpo", "lora", prefs_jsonl, None, "orpo.lam=-1", "simpo.beta=0", "simpo.gamma=-0.5")
    message = str(err.value)
    for needle in ("orpo.lam: must be 0 or more, got -1", "simpo.beta: must be greater than 0, got 0",
                   "simpo.gamma: must be 0 or more, got -0.5"):
        assert needle in message
    with pytest.raises(ConfigError, match="data.train: task simpo needs a preference file"):
        config(tiny_llama, "simpo", "lora", "chatterbot")
    with pytest.raises(ConfigError, match="did you mean"):
        config(tiny_llama, "orpo", "lora", prefs_jsonl, None, "orpo.lamda=0.2")
