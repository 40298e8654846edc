"""Reward models and DPO in the one training loop, on tiny random models and a learnable
preference set: every chosen response holds a positive word, every rejected one a negative word."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from deltatune.cli import main
from deltatune.components import supports
from deltatune.errors import ConfigError, DataError
from deltatune.inference import evaluate_file, load_run, score
from deltatune.methods import registry
from deltatune.rlhf.losses import dpo_loss
from deltatune.tasks.reward import ranking_loss
from deltatune.rundir import RunDir
from deltatune.tasks import registry as tasks
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job, train
from tests.conftest import FILLER, NEGATIVE, POSITIVE, _tokenizer, write_jsonl
from tests.helpers import config

LEARN = ["train.epochs=6", "train.lr=3e-2", "train.warmup_ratio=0"]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs over 20 prompts: the same filler, then a positive (chosen) or negative (rejected) word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = rng.sample(FILLER, 3)
        rows.append({"prompt": f"what is {i % 20}", "chosen": " ".join(filler + [rng.choice(POSITIVE)]),
                     "rejected": " ".join(filler + [rng.choice(NEGATIVE)])})
    return rows


def ranking_rows(n: int, seed: int = 0) -> list[dict]:
    """Rankings of three: two positive words > filler only > two negative words, listed shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        filler = rng.sample(FILLER, 3)
        best_first = [" ".join(filler + rng.sample(POSITIVE, 2)), " ".join(rng.sample(FILLER, 4)),
                      " ".join(filler + rng.sample(NEGATIVE, 2))]
        order = rng.sample(range(3), 3)  # order[j]: where best_first[j] is listed
        listed = [None] * 3
        for rank, position in enumerate(order):
            listed[position] = best_first[rank]
        rows.append({"prompt": f"what is {i % 20}", "responses": listed, "ranking": order})
    return rows


@pytest.fixture
def prefs_jsonl(tmp_path):
    return write_jsonl(tmp_path / "prefs.jsonl", preference_rows(80))


def metrics_of(run: RunDir) -> dict:
    return json.loads((run.path / "metrics.json").read_text())


def hand_logp(model, example: dict, average: bool = False) -> torch.Tensor:
    """log p(response | prompt), one next-token distribution at a time, on the unpadded sequence."""
    ids = torch.tensor([example["input_ids"]])
    logits = model(input_ids=ids).logits[0, -ids.shape[1]:]
    terms = [torch.log_softmax(logits[t - 1].float(), -1)[label]
             for t, label in enumerate(example["labels"]) if t > 0 and label != -100]
    total = torch.stack(terms).sum()
    return total / len(terms) if average else total


# ----------------------------------------------------------------------------- reward models

@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_reward_model_learns_pairs_end_to_end(kind, request, prefs_jsonl, tmp_path, capsys):
    model_path = request.getfixturevalue(f"tiny_{kind}")
    run = train(config(model_path, "reward", "lora", prefs_jsonl, tmp_path / "run", *LEARN))
    metrics = metrics_of(run)
    before, after = metrics["baseline"], metrics["eval"]
    assert after["pairs"] == before["pairs"] == 16  # 4 of 20 prompts held out, 4 pairs each
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    assert after["margin"] > before["margin"] + 1.0
    assert after["loss"] < before["loss"] - 0.3
    assert (run.path / "delta").is_dir() and not (run.path / "labels.json").exists()

    assert main(["eval", str(run.path)]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    # The reloaded model scores texts as training did: margins from score() match evaluate_file's.
    loaded = load_run(run.path)
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(12, seed=7))
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    chosen = score(loaded, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = score(loaded, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    result = evaluate_file(loaded, str(held))
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert result["margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert result["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))


def test_listwise_reward_learns_rankings(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "rankings.jsonl", ranking_rows(60))
    run = train(config(tiny_bert, "reward", "full", data, tmp_path / "run", "reward.loss=listwise",
                       "train.epochs=6", "train.lr=3e-3", "train.warmup_ratio=0"))
    metrics = metrics_of(run)
    assert metrics["eval"]["rankings"] == 12 and metrics["eval"]["pairs"] == 36  # 3 pairs per ranking
    assert metrics["eval"]["accuracy"] >= 0.9 > metrics["baseline"]["accuracy"]
    assert metrics["eval"]["loss"] < metrics["baseline"]["loss"]


def test_ranking_losses_equal_hand_computation():
    scores = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.9])  # a ranking of three, then a pair, best first
    sizes = torch.tensor([3, 2])
    pairs = [(0, 1), (0, 2), (1, 2), (3, 4)]
    total, count = ranking_loss(scores, sizes, "pairwise")
    expected = sum(math.log1p(math.exp(-(scores[i] - scores[j]).item())) for i, j in pairs) / 4
    assert count == 4 and (total / count).item() == pytest.approx(expected, rel=1e-6)

    def plackett_luce(xs):
        return -sum(xs[i] - math.log(sum(math.exp(x) for x in xs[i:])) for i in range(len(xs)))

    total, count = ranking_loss(scores, sizes, "listwise")
    expected = (plackett_luce([2.0, 0.5, -1.0]) + plackett_luce([0.3, 0.9])) / 2
    assert count == 2 and (total / count).item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- DPO

def test_dpo_raises_held_out_margin_end_to_end(tiny_llama, prefs_jsonl, tmp_path):
    run = train(config(tiny_llama, "dpo", "lora", prefs_jsonl, tmp_path / "run", "train.epochs=3", "train.lr=1e-2"))
    metrics = metrics_of(run)
    before, after = metrics["baseline"], metrics["eval"]
    # Before training the policy is the reference: every margin is exactly 0.
    assert before["margin"] == 0.0 and before["accuracy"] == 0.0
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["margin"] > 0.01 and after["accuracy"] >= 0.9
    assert after["chosen_logp_change"] > after["rejected_logp_change"]
    # Reloaded, with the adapter switched off as the reference, the figures come back.
    again = evaluate_file(load_run(run.path), str(prefs_jsonl))
    assert again["pairs"] == 80 and again["accuracy"] >= 0.9


def test_reference_runs_once_and_is_the_base_model(tiny_llama, prefs_jsonl, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.LlamaModel.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counted)
    # max_steps 6 with batches of 8 and evaluation every 3 steps; plain loss: no chunked-loss self-check
    cfg = config(tiny_llama, "dpo", "lora", prefs_jsonl, None, "train.max_steps=6", "train.eval_every=3",
                 "train.lr=2e-2", "train.chunked_loss=false")
    job, _, _ = build_job(cfg, None)
    n_train, n_eval = len(job.train_examples), len(job.eval_examples)
    eval_batches = math.ceil(n_eval / 16)
    assert calls == [False] * (math.ceil(n_train / 16) + eval_batches)  # the reference: once per example
    calls.clear()
    job.run = RunDir(prefs_jsonl.parent / "run")
    job.run.path.mkdir()
    run_loop(job)
    # Training and evaluation run the policy only: one forward per step, one per eval batch.
    assert calls.count(True) == 6 and calls.count(False) == 2 * eval_batches

    model = job.model.eval()
    with torch.no_grad():
        for example in job.train_examples[:4]:
            with model.disable_adapter():
                base = [hand_logp(model, example[side]).item() for side in ("chosen", "rejected")]
            policy = hand_logp(model, example["chosen"]).item()
            assert example["reference"] == pytest.approx(base, abs=1e-4)
            assert abs(policy - base[0]) > 1e-3  # the adapter did change the policy


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_batch_loss_equals_dpo_loss_of_hand_logps(tiny_llama, prefs_jsonl, chunked, loss):
    cfg = config(tiny_llama, "dpo", "lora", prefs_jsonl, None, f"dpo.loss={loss}", "dpo.beta=0.5")
    job, _, _ = build_job(cfg, None)
    model = job.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    examples = job.train_examples[:5]
    job.task.chunked = chunked  # the task carries the run's dpo.* settings
    batch = job.task.collate(examples)
    total, count = job.task.loss(model, batch)
    average = loss == "ipo"
    with torch.no_grad():
        chosen = torch.stack([hand_logp(model, e["chosen"], average) for e in examples])
        rejected = torch.stack([hand_logp(model, e["rejected"], average) for e in examples])
    ref = torch.tensor([e["reference"] for e in examples])
    expected, _, _ = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], beta=0.5, loss_type=loss)
    assert count == 5
    torch.testing.assert_close(total.detach() / count, expected, rtol=1e-4, atol=1e-5)
    assert abs(expected.item() - dpo_loss(ref[:, 0], ref[:, 1], ref[:, 0], ref[:, 1], 0.5, loss)[0].item()) > 1e-3


# ----------------------------------------------------------------------------- data and config

def test_split_keeps_each_prompt_on_one_side(tiny_bert, prefs_jsonl):
    job, data, _ = build_job(config(tiny_bert, "reward", "lora", prefs_jsonl), None)
    train_prompts = {r["prompt"] for r in data.train.rows}
    eval_prompts = {r["prompt"] for r in data.eval.rows}
    assert not train_prompts & eval_prompts
    assert len(eval_prompts) == 4 and len(train_prompts) == 16
    assert len(job.train_examples) == 64 and all(len(e["responses"]) == 2 for e in job.train_examples)


def test_bad_preference_row_names_file_and_row(tiny_llama, tmp_path):
    rows = preference_rows(40)
    rows[6] = {"prompt": "what is 1", "chosen": "good film", "rejected": "good film"}
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: row 7: 'chosen' and 'rejected' are the same"):
        build_job(config(tiny_llama, "dpo", "lora", path), None)
    run = train(config(tiny_llama, "dpo", "lora", path, tmp_path / "run", "data.on_error=skip", "train.max_steps=1"))
    rejects = [json.loads(line) for line in (run.path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["row"]) for r in rejects] == [(str(path), 7)]
    assert json.loads((run.path / "data_report.json").read_text())["rejected_rows"] == 1
    assert (run.path / "data_report.html").is_file() and (run.path / "delta").is_dir()


def test_config_checks_for_preference_tasks(tiny_bert, prefs_jsonl):
    with pytest.raises(ConfigError) as err:
        config(tiny_bert, "reward", "lora", prefs_jsonl, None, "reward.loss=ranked", "dpo.loss=hinge",
               "dpo.beta=0", "data.pack=true", "data.kfold=3")
    message = str(err.value)
    for needle in ("reward.loss: 'ranked'", "dpo.loss: 'hinge'", "dpo.beta: must be greater than 0",
                   "data.pack", "kfold do not apply to task reward"):
        assert needle in message
    with pytest.raises(ConfigError, match="data.train: task dpo needs a preference file"):
        config(tiny_bert, "dpo", "lora", "chatterbot")
    with pytest.raises(ConfigError, match="feature_extraction does not support task 'reward'"):
        config(tiny_bert, "reward", "feature_extraction", prefs_jsonl)


# ----------------------------------------------------------------------------- every method, one step

def _tiny_gpt2(path):
    """A causal LM with bias terms (for bitfit), built like conftest's tiny models."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(chat=True)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _model_for(task: str, method: str, request, tmp_path):
    if method == "qlora":  # bitsandbytes' CPU 4-bit kernels need widths in blocks of 64
        return request.getfixturevalue("tiny_llama64")
    if task == "dpo" and method == "bitfit":  # Llama has no biases
        return _tiny_gpt2(tmp_path / "gpt2")
    return request.getfixturevalue("tiny_bert" if task == "reward" else "tiny_llama")


CASES = [(task, m) for task in ("reward", "dpo") for m in registry.names()
         if supports(registry.get(m), tasks.get(task)) is None]


@pytest.mark.parametrize("task,method", CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_every_listed_method_trains_a_step(task, method, request, prefs_jsonl, tmp_path):
    model_path = _model_for(task, method, request, tmp_path)
    cfg = config(model_path, task, method, prefs_jsonl, None, "train.max_steps=2", "train.lr=1e-2",
                 "train.warmup_ratio=0", "data.train_limit=16")
    job, _, _ = build_job(cfg, None)
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    before = {n: p.detach().clone() for n, p in job.model.named_parameters() if p.requires_grad}
    best, state = run_loop(job)
    assert state.step == 2 and math.isfinite(state.loss)
    changed = [n for n, p in job.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed
    if task == "reward":  # the fresh scalar head must learn too
        assert any(("score" in n or "classifier" in n) for n in changed)
    assert {"loss", "accuracy", "margin"} <= set(best)
