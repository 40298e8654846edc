"""QLoRA: a real 4-bit NF4 base (bitsandbytes on the CPU), LoRA on top, exact fp32 merge."""

import bitsandbytes as bnb
import pytest
import torch

from deltatune.eval.evaluate import evaluate
from deltatune.methods import registry
from deltatune.tasks import registry as tasks
from deltatune.models import count_parameters, load_model
from deltatune.rundir import RunDir
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job
from tests.helpers import config


@pytest.fixture
def trained(tiny_llama64, qa_jsonl, tmp_path):
    cfg = config(tiny_llama64, "causal_lm", "qlora", qa_jsonl, None, "train.epochs=3", "train.lr=1e-2",
                 "method.target_modules=[q_proj,v_proj]")
    job, data, tok = build_job(cfg, None)
    job.run = RunDir(tmp_path)
    before = evaluate(job.model, job.eval_examples, "causal_lm", 16, job.pad_id)["loss"]
    run_loop(job)
    return cfg, job, before


def test_qlora_trains_lora_on_a_4bit_base(trained, tiny_llama64):
    cfg, job, before = trained
    model = job.model
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every projection of both layers is stored in 4 bits
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in quantized)
    assert evaluate(model, job.eval_examples, "causal_lm", 16, job.pad_id)["loss"] < before
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # The count treats a 4-bit weight as its logical size, so totals match the fp32 model's.
    fp32_total = count_parameters(load_model(tiny_llama64, "causal"))[1]
    assert count_parameters(model)[1] == fp32_total + sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_qlora_merge_dequantizes_then_merges_exactly(trained):
    cfg, job, _ = trained
    model = job.model.eval()
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    with torch.no_grad():
        expected = model(**batch).logits
        merged = registry.get("qlora").merge(model).eval()
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
        assert all(p.dtype == torch.float32 for p in merged.parameters())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)


def test_qlora_delta_reloads(trained, tiny_llama64, tmp_path):
    cfg, job, _ = trained
    _assert_delta_reloads(cfg, job, tiny_llama64, tmp_path)


def _assert_delta_reloads(cfg, job, base_path, tmp_path):
    """The saved delta on a freshly quantized base gives the trained model's logits exactly."""
    impl = registry.get("qlora")
    impl.save_delta(job.model, tmp_path / "delta", cfg.method.options)
    base = load_model(base_path, "causal", **impl.load_kwargs(cfg.method.options))
    reloaded = impl.load_delta(base, tmp_path / "delta", cfg.method.options, tasks.get("causal_lm")).eval()
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    with torch.no_grad():
        assert torch.equal(job.model.eval()(**batch).logits, reloaded(**batch).logits)


def test_loftq_starts_at_the_best_rank_r_correction_of_the_quantization_error(tiny_llama64, qa_jsonl):
    from safetensors.torch import load_file

    from deltatune.methods.qlora import _dequantized
    from peft.tuners.lora import Linear4bit

    cfg = config(tiny_llama64, "causal_lm", "qlora", qa_jsonl, None, "method.init=loftq", "method.r=4",
                 "method.alpha=16", "method.target_modules=[q_proj,v_proj,up_proj]")
    job, _, _ = build_job(cfg, None)
    original = load_file(tiny_llama64 / "model.safetensors")
    layers = {n: m for n, m in job.model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 6
    for name, module in layers.items():
        weight = original[name.removeprefix("base_model.model.") + ".weight"].float()
        quantized = _dequantized(module.get_base_layer())
        start = quantized + module.get_delta_weight("default").detach().float()  # Q(W) + s B A, s = 16 / 4
        tail = torch.linalg.svdvals(weight - quantized)[4:]  # what no rank-4 correction can reach
        assert float(torch.linalg.norm(weight - start)) == pytest.approx(float(tail.norm()), rel=1e-4)
        assert torch.linalg.norm(weight - start) < torch.linalg.norm(weight - quantized)  # 64 x 64 noise: ~8 % less
    plain = build_job(config(tiny_llama64, "causal_lm", "qlora", qa_jsonl, None, "method.r=4", "method.alpha=16",
                             "method.target_modules=[q_proj,v_proj,up_proj]"), None)[0].model.eval()
    fp32 = load_model(tiny_llama64, "causal").eval()
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    with torch.no_grad():
        want = fp32(**batch).logits
        loftq_gap = (job.model.eval()(**batch).logits - want).abs().mean()
        plain_gap = (plain(**batch).logits - want).abs().mean()
    assert loftq_gap < plain_gap  # the quantized model starts closer to the original


def test_loftq_delta_trains_and_reloads(tiny_llama64, qa_jsonl, tmp_path):
    cfg = config(tiny_llama64, "causal_lm", "qlora", qa_jsonl, None, "method.init=loftq", "train.max_steps=2",
                 "method.target_modules=[q_proj,v_proj]")
    job, _, _ = build_job(cfg, None)
    job.run = RunDir(tmp_path)
    run_loop(job)
    _assert_delta_reloads(cfg, job, tiny_llama64, tmp_path)
