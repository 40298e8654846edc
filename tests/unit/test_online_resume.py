"""PPO and GRPO runs (train/online.py) resume from their checkpoints: a run stopped after step k and resumed with
`deltatune train --resume` ends with the same delta (bit for bit), log, samples and metrics as a run that never
stopped; a resume that would not give that (a changed config or data, a damaged checkpoint) is refused, saying
what changed and what to do. Killed runs, at every commit point, are in tests/unit/test_crash_points.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.errors import RunError
from deltatune.train.run import resume, train
from tests.conftest import sentiment_rows, write_jsonl
from tests.helpers import config

# Draws from python's and numpy's global generators: a resumed run must go on with their streams too.
NOISY_REWARD = """\
import random

import numpy as np


def noisy(prompts, responses):
    return [r.split().count('good') / max(len(r.split()), 1) + 0.01 * random.random() + 0.01 * float(np.random.rand())
            for r in responses]
"""
# 5 iterations, a checkpoint after 2 and 4; several minibatches and epochs per iteration, so the minibatch order's
# generator matters; PPO's adaptive KL coefficient moves every iteration (and is logged).
COMMON = ["data.chat_template=false", "train.max_steps=5", "train.save_every=2", "train.lr=1e-2", "data.eval_limit=8",
          "method.dropout=0"]
SETTINGS = {
    "ppo": ["ppo.reward_fn={reward}:noisy", "ppo.rollout_batch=4", "ppo.minibatch=2", "ppo.ppo_epochs=2",
            "ppo.max_new_tokens=6"],
    "grpo": ["grpo.rewards=[{{function: format, pattern: good}}, {{function: '{reward}:noisy', weight: 0.5}}]",
             "grpo.prompts_per_step=2", "grpo.minibatch=4", "grpo.epochs_per_batch=2", "grpo.max_new_tokens=6"],
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (conftest)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online")
    (folder / "noisy_reward.py").write_text(NOISY_REWARD)
    prompts = write_jsonl(folder / "prompts.jsonl", [{"prompt": " ".join(r["text"].split()[:3])}
                                                     for r in sentiment_rows(40)])
    return folder / "noisy_reward.py", prompts


def _config(task, model, inputs, out, *extra):
    reward, prompts = inputs
    return config(model, task, "lora", prompts, out, *COMMON, *(s.format(reward=reward) for s in SETTINGS[task]),
                  *extra)


def _interrupted(task, model, inputs, out, at_step):
    def interrupt(state):
        if state.step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(task, model, inputs, out), callbacks=(interrupt,))
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"


def _outcome(path):
    log = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
           for line in (path / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((path / "metrics.json").read_text())
    delta = {f"{file.name}:{k}": v for file in sorted((path / "delta").glob("*.safetensors"))
             for k, v in load_file(file).items()}
    kept = {k: metrics[k] for k in ("eval", "baseline", "steps", "reward_gain", "rollouts", "completions")
            if k in metrics}
    return log, kept, (path / "samples.jsonl").read_text(), delta


@pytest.fixture(scope="module")
def straight(tiny_llama, inputs, tmp_path_factory):
    """The uninterrupted runs, once per task."""
    runs = {}

    def get(task):
        if task not in runs:
            runs[task] = _outcome(train(_config(task, tiny_llama, inputs, tmp_path_factory.mktemp(task) / "run")).path)
        return runs[task]
    return get


@pytest.mark.parametrize("task,stop_at", [("ppo", 3), ("grpo", 3), ("ppo", 4), ("grpo", 1)],
                         ids=["ppo-after-a-checkpoint", "grpo-after-a-checkpoint", "ppo-at-a-checkpoint",
                              "grpo-before-any-checkpoint"])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(task, stop_at, tiny_llama, inputs, straight, tmp_path):
    out = tmp_path / "run"
    _interrupted(task, tiny_llama, inputs, out, stop_at)
    saved_at = stop_at // 2 * 2  # save_every=2
    if saved_at:
        assert json.loads((out / "checkpoint" / "state.json").read_text())["loop"]["step"] == saved_at
    else:
        assert not (out / "checkpoint").exists()
    assert main(["train", "--quiet", "--resume", str(out)]) == 0
    log, metrics, samples, delta = _outcome(out)
    expected_log, expected_metrics, expected_samples, expected_delta = straight(task)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]  # the steps after the checkpoint are not logged twice
    assert log == expected_log  # rewards, losses, KL (and PPO's kl_coef), exactly
    assert metrics == expected_metrics and samples == expected_samples
    assert delta.keys() == expected_delta.keys() and all(torch.equal(delta[k], expected_delta[k]) for k in delta)
    if task == "ppo":
        assert "value_head.safetensors:weight" in delta
        assert len({r["kl_coef"] for r in log}) == 5  # the adaptive coefficient moved, and came back on resume
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    assert not (out / "checkpoint").exists() and not list(out.glob(".*"))


def test_resume_refuses_a_changed_config_and_names_the_change(tiny_llama, inputs, straight, tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted("ppo", tiny_llama, inputs, out, 3)
    assert main(["train", "--resume", str(out), "ppo.kl_coef=0.1"]) == 2  # overrides on the command line
    assert "also given ppo.kl_coef=0.1, but a run resumes with the config it started with" in capsys.readouterr().err
    original = (out / "config.yaml").read_text()
    assert "  kl_coef: 0.05\n" in original and "  lr: 0.01\n" in original
    (out / "config.yaml").write_text(original.replace("  kl_coef: 0.05\n", "  kl_coef: 0.1\n")
                                     .replace("  lr: 0.01\n", "  lr: 0.02\n"))
    with pytest.raises(RunError, match=r"config changed since the run's last checkpoint: ppo.kl_coef \(was 0.05, now "
                                       r"0.1\); train.lr \(was 0.01, now 0.02\)\. .*put them back in config.yaml, "
                                       "or start a new run"):
        resume(out)
    assert main(["train", "--resume", str(out)]) != 0
    assert "ppo.kl_coef (was 0.05, now 0.1)" in capsys.readouterr().err
    (out / "config.yaml").write_text(original.replace("progress: false", "progress: true"))  # shown, not trained
    resume(out)
    assert _outcome(out)[3].keys() == straight("ppo")[3].keys()
    assert all(torch.equal(_outcome(out)[3][k], v) for k, v in straight("ppo")[3].items())


def test_resume_refuses_changed_data_and_a_damaged_checkpoint(tiny_llama, inputs, tmp_path):
    out = tmp_path / "run"
    _interrupted("grpo", tiny_llama, inputs, out, 3)
    state = out / "checkpoint" / "state.json"
    info = json.loads(state.read_text())
    del info["extra"]["rng"]
    state.write_text(json.dumps(info))
    with pytest.raises(RunError, match=r"lacks the GRPO loop's state .*damaged. Remove the folder .*checkpoint"):
        resume(out)
    shutil.rmtree(out / "checkpoint")
    reward, prompts = inputs
    changed = tmp_path / "prompts.jsonl"
    shutil.copy(prompts, changed)
    config_text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(config_text.replace(str(prompts), str(changed)))
    changed.write_text(changed.read_text().replace("good", "fine"))
    with pytest.raises(RunError, match="the data changed since this run started"):
        resume(out)
