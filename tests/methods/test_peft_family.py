"""VeRA, LoHa, LoKr, OFT and AdaLoRA (peft 0.21) on the tiny models: the saved delta is a peft adapter that
peft itself loads, the trainable parameters follow each method's definition, VeRA's delta carries its random
matrices, and AdaLoRA's rank schedule and orthogonality penalty are those of peft's own training path.

Merge parity (tests/methods/test_method_properties.py), the trained delta and its bit-identical reload
(test_methods.py), every task (test_matrix.py) and bit-identical resume (tests/unit/test_resume.py) have
table entries for these methods elsewhere.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.methods import registry
from deltatune.models import load_model
from deltatune.rundir import RunDir
from deltatune.tasks import registry as tasks
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job
from tests.helpers import config

NEW = ["vera", "loha", "lokr", "oft", "adalora"]
HIDDEN, LAYERS, LABELS = 32, 2, 2  # the tiny BERT; peft adapts query and value of each layer by default
ADAPTED = LAYERS * 2
HEAD = HIDDEN * LABELS + LABELS


def _trained(model_path, task, method, data, tmp_path, *extra):
    cfg = config(model_path, task, method, data, None, "train.max_steps=4", "train.lr=2e-2", "train.warmup_ratio=0",
                 *extra)
    job, prepared, tokenizer = build_job(cfg, None)
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    run_loop(job)
    return job, cfg, prepared, tokenizer


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("kind,task,data", [("bert", "classification", "cls_csv"), ("llama", "causal_lm", "qa_jsonl")],
                         ids=["bert", "llama"])
def test_peft_loads_the_saved_delta(method, kind, task, data, request, tmp_path):
    model_path = request.getfixturevalue(f"tiny_{kind}")
    job, cfg, prepared, tokenizer = _trained(model_path, task, method, request.getfixturevalue(data), tmp_path)
    registry.get(method).save_delta(job.model, tmp_path / "delta", cfg.method.options)
    fresh = load_model(model_path, tasks.get(task).head, prepared.labels, tokenizer.pad_token_id)
    theirs = PeftModel.from_pretrained(fresh, tmp_path / "delta")
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    # AdaLoRA's delta keeps only the ranks left unmasked: the same sum with fewer (zero) terms, equal up to rounding.
    torch.testing.assert_close(_logits(theirs, batch), _logits(job.model, batch), rtol=0, atol=1e-6)


def test_trainable_counts_follow_each_methods_definition(tiny_bert, capsys):
    assert main(["methods", "--model", str(tiny_bert), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    counts = {name: rows[name]["trainable_params"] - HEAD for name in NEW}
    assert counts["vera"] == ADAPTED * (256 + HIDDEN)  # vectors d (r = 256) and b (d_out) per layer
    assert counts["loha"] == ADAPTED * 2 * 8 * (HIDDEN + HIDDEN)  # two rank-8 pairs B A per layer
    # 32 = 4 x 8 on both sides: W1 4 x 4 and W2 8 x 8, full since r = 8 is not below max(8, 8) / 2
    assert counts["lokr"] == ADAPTED * (4 * 4 + 8 * 8)
    assert counts["oft"] == ADAPTED * (HIDDEN // 32) * (32 * 31 // 2)  # upper triangles of skew-symmetric blocks
    assert counts["adalora"] == ADAPTED * 12 * (HIDDEN + HIDDEN + 1)  # P, Q and e at init_r = 12
    assert all(rows[name]["targets"] == ["query", "value"] for name in NEW)


@pytest.mark.parametrize("method,options,per_layer", [
    ("vera", ["method.r=16"], 16 + HIDDEN),
    ("lokr", ["method.r=2"], 4 * 4 + 2 * (8 + 8)),  # r = 2 < 8 / 2: W2 = B2 A2 (8 x 2, 2 x 8)
    ("lokr", ["method.r=1", "method.decompose_both=true"], 1 * (4 + 4) + 1 * (8 + 8)),  # W1 low-rank too
    ("oft", ["method.block_size=8"], (HIDDEN // 8) * (8 * 7 // 2)),
    ("oft", ["method.block_size=8", "method.block_share=true"], 8 * 7 // 2),
    ("adalora", ["method.init_r=6", "method.target_r=2"], 6 * (HIDDEN + HIDDEN + 1)),
], ids=["vera-r16", "lokr-lowrank", "lokr-both", "oft-8", "oft-shared", "adalora-6"])
def test_trainable_counts_with_options(method, options, per_layer, tiny_bert, cls_csv):
    job, _, _ = build_job(config(tiny_bert, "classification", method, cls_csv, None, *options), None)
    assert sum(p.numel() for p in job.model.parameters() if p.requires_grad) == ADAPTED * per_layer + HEAD


def test_vera_delta_carries_its_random_matrices(tiny_bert, cls_csv, tmp_path):
    job, cfg, prepared, tokenizer = _trained(tiny_bert, "classification", "vera", cls_csv, tmp_path)
    impl = registry.get("vera")
    impl.save_delta(job.model, tmp_path / "delta", cfg.method.options)
    saved = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    assert saved["base_model.vera_A"].shape == (256, HIDDEN) and saved["base_model.vera_B"].shape == (HIDDEN, 256)
    # Another seed in adapter_config.json would draw other matrices; the reload must read the saved ones.
    settings = tmp_path / "delta" / "adapter_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "projection_prng_key": 12345}))
    fresh = load_model(tiny_bert, "sequence", prepared.labels, tokenizer.pad_token_id)
    reloaded = impl.load_delta(fresh, tmp_path / "delta", cfg.method.options, tasks.get("classification"))
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    assert torch.equal(_logits(reloaded, batch), _logits(job.model, batch))
    other = build_job(config(tiny_bert, "classification", "vera", cls_csv, None, "method.projection_seed=12345"),
                      None)[0].model
    assert not torch.equal(other.base_model.vera_A["default"], job.model.base_model.vera_A["default"])


def test_adalora_moves_its_rank_budget_over_the_runs_steps(tiny_bert, cls_csv, tmp_path):
    job, cfg, _, _ = _trained(tiny_bert, "classification", "adalora", cls_csv, tmp_path, "train.max_steps=10",
                              "method.init_fraction=0.2", "method.final_fraction=0.3")
    settings = job.model.peft_config["default"]
    assert (settings.total_step, settings.tinit, settings.tfinal) == (10, 2, 3)
    kept = {name: sum(keep) for name, keep in settings.rank_pattern.items()}
    assert len(kept) == ADAPTED and sum(kept.values()) == 8 * ADAPTED  # target_r per layer on average
    for name, e in job.model.named_parameters():
        if ".lora_E." in name:  # the removed ranks' singular values are zero
            keep = torch.tensor(settings.rank_pattern[name.replace(".default", "").removeprefix("base_model.model.")])
            assert torch.all(e[~keep] == 0) and torch.all(e[keep] != 0)
    impl = registry.get("adalora")
    impl.save_delta(job.model, tmp_path / "delta", cfg.method.options)
    saved = load_file(tmp_path / "delta" / "adapter_model.safetensors")
    assert sorted(v.shape[0] for k, v in saved.items() if ".lora_E" in k) == sorted(kept.values())


@pytest.mark.parametrize("steps", [1, 2])
def test_adalora_runs_too_short_for_its_schedule_finish(tiny_bert, cls_csv, tmp_path, steps):
    """One or two steps leave no step to measure importance on before the final cut: the run still finishes
    (peft's allocator would look up averages it never made)."""
    job, _, _, _ = _trained(tiny_bert, "classification", "adalora", cls_csv, tmp_path, f"train.max_steps={steps}")
    assert job.model.peft_config["default"].total_step == steps


def test_adalora_penalty_is_peft_loss_plus_penalty(tiny_bert, cls_csv):
    """The gradient of one training step equals the gradient of peft's own loss, the model's loss (labels given)
    plus orth_reg_weight times the penalty, which peft adds in AdaLoraModel.forward."""
    cfg = config(tiny_bert, "classification", "adalora", cls_csv, None, "method.orth_reg_weight=2.0")
    ours, theirs = build_job(cfg, None)[0], build_job(cfg, None)[0]
    batch = ours.task.collate(ours.train_examples[:8])
    getattr(theirs.model, "deltatune_penalty_pending").fill_(False)  # peft's path alone
    for job in (ours, theirs):
        with torch.no_grad():
            for name, p in job.model.named_parameters():
                if ".lora_E." in name:  # not 0, so that the loss reaches P and Q too
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    torch.manual_seed(0)
    ours.model.train()
    loss_sum, count = ours.task.loss(ours.model, batch)
    (loss_sum / count).backward()
    torch.manual_seed(0)
    theirs.model.train()
    theirs.model(**batch["inputs"], labels=batch["targets"]).loss.backward()
    grads = {n: p.grad for n, p in theirs.model.named_parameters() if p.requires_grad}
    for name, p in ours.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(".lora_A." in n and g.abs().sum() > 0 for n, g in grads.items())


def test_adalora_penalty_joins_each_step_once(tiny_bert, cls_csv):
    """With two micro-batches per step the penalty's gradient is added in the first only; the next step's first
    micro-batch adds it again (after_step re-arms it); forwards without gradients never consume it."""
    job = build_job(config(tiny_bert, "classification", "adalora", cls_csv), None)[0]
    model, batch, impl = job.model.train(), job.task.collate(job.train_examples[:4]), registry.get("adalora")
    pending = getattr(model, "deltatune_penalty_pending")
    with torch.no_grad():
        job.task.loss(model, batch)
    assert bool(pending)
    job.task.loss(model, batch)[0].backward()
    assert not bool(pending)
    job.task.loss(model, batch)[0].backward()
    impl.after_step(model, job.options, 1, 10)
    assert bool(pending)


def test_adalora_step_with_nonfinite_gradients_moves_nothing(tiny_bert, cls_csv):
    job = build_job(config(tiny_bert, "classification", "adalora", cls_csv), None)[0]
    model, impl = job.model, registry.get("adalora")
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, math.nan if ".lora_E." in name else 1.0)
    impl.after_step(model, job.options, 1, 10)
    assert impl.loop_state(model) == {}  # no importance recorded, no rank removed
