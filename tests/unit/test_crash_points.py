"""Fault injection: a run killed (SIGKILL) at any of its commit points loses nothing.

``DELTATUNE_FAULT_AT=N`` kills the process at its N-th commit point (fs.commit_point: every
atomic write, every step of a folder swap, the finish). For a short run of each kind, every point
is tried: the killed run, resumed (or, killed before it wrote its config, started again in the same
folder), must end with the same delta, bit for bit, and the same metrics as an uninterrupted run;
or be complete already. The killed runs are forked from a process that imported deltatune once.
"""

from __future__ import annotations

import json
import os
import signal
import multiprocessing

import pytest
import torch
from safetensors.torch import load_file

from deltatune import fs
from deltatune.train.run import resume, train
from tests.conftest import qa_rows, sentiment_rows, write_jsonl
from tests.helpers import config
from tests.unit.test_reward_dpo import preference_rows

# 3 optimizer steps (PPO, GRPO: iterations): checkpoints after steps 1 and 2 (the second replaces the first),
# evaluations (and the best delta) after steps 2 and 3 (PPO, GRPO: before and after training), then the finish.
SHORT = ["train.max_steps=3", "train.eval_every=2", "train.save_every=1", "train.lr=1e-2", "train.warmup_ratio=0"]
SAMPLED = ["data.chat_template=false", "data.eval_limit=4", "method.dropout=0"]


def _case(kind, tmp_path, request):
    """(model, data, method, what else the run sets)."""
    if kind == "classification":
        return request.getfixturevalue("tiny_bert"), request.getfixturevalue("cls_csv"), "lora", []
    llama = request.getfixturevalue("tiny_llama")
    if kind == "causal_lm":
        return llama, write_jsonl(tmp_path / "qa.jsonl", qa_rows(40)), "lora", []
    if kind == "dpo":
        return llama, write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40)), "ia3", []
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": " ".join(r["text"].split()[:3])}
                                                       for r in sentiment_rows(24)])
    if kind == "ppo":
        (tmp_path / "reward.py").write_text("def reward(prompts, responses):\n"
                                            "    return [r.count('good') for r in responses]\n")
        return llama, prompts, "lora", [*SAMPLED, f"ppo.reward_fn={tmp_path / 'reward.py'}:reward",
                                        "ppo.rollout_batch=2", "ppo.minibatch=1", "ppo.max_new_tokens=4"]
    return llama, prompts, "lora", [*SAMPLED, "grpo.rewards=[{function: format, pattern: good}]",
                                    "grpo.prompts_per_step=1", "grpo.group_size=2", "grpo.max_new_tokens=4"]


def _killed_run(model, task, method, data, out, extra, registry, point):
    """In a forked child: train until the ``point``-th commit point kills the process."""
    os.environ.update(DELTATUNE_FAULT_AT=str(point), DELTATUNE_REGISTRY=registry)
    train(config(model, task, method, data, out, *SHORT, *extra))


def _processes():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["deltatune.train.run"])
    return context


def _outcome(path):
    metrics = json.loads((path / "metrics.json").read_text())
    delta = {}
    for file in sorted((path / "delta").glob("*.safetensors")):
        delta.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return metrics["eval"], metrics["baseline"], delta


@pytest.mark.parametrize("kind", ["classification", "causal_lm", "dpo", "ppo", "grpo"])
def test_every_commit_point(kind, tmp_path, request):
    model, data, method, extra = _case(kind, tmp_path, request)
    task = kind
    before = fs._commits
    reference = _outcome(train(config(model, task, method, data, tmp_path / "straight", *SHORT, *extra)).path)
    points = fs._commits - before
    assert points >= 20, points  # inputs, 2 checkpoints, 2 best deltas (PPO, GRPO: baseline and samples), the finish

    context = _processes()
    outcomes = {"resumed": 0, "complete": 0, "restarted": 0}
    for point in range(1, points + 1):
        out = tmp_path / f"killed-{point}"
        child = context.Process(target=_killed_run, args=(model, task, method, data, out, extra,
                                                         os.environ["DELTATUNE_REGISTRY"], point))
        child.start()
        child.join()
        assert child.exitcode == -signal.SIGKILL, (point, child.exitcode)
        if not (out / "config.yaml").exists():  # killed before the run wrote anything that says what it is
            assert not out.exists() or not any(p for p in out.iterdir() if not p.name.startswith(".")), point
            train(config(model, task, method, data, out, *SHORT, *extra))
            outcomes["restarted"] += 1
        elif (out / "metrics.json").exists() and (out / "delta").is_dir():
            resume(out)  # only completes the finish
            outcomes["complete"] += 1
        else:
            resume(out)
            outcomes["resumed"] += 1
        eval_after, baseline, delta = _outcome(out)
        assert (eval_after, baseline) == reference[:2], point
        assert delta.keys() == reference[2].keys(), point
        assert all(torch.equal(delta[k], reference[2][k]) for k in delta), point
        assert json.loads((out / "status.json").read_text())["status"] == "completed", point
        leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") or p.name in ("best", "checkpoint")]
        assert not leftovers, (point, leftovers)
    assert outcomes["resumed"] > 10 and outcomes["complete"] >= 1, outcomes
