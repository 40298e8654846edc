"""deltatune.kernels: the fused paths compute what the model's own modules compute (forward and gradients, to
1e-5), keep less for backward, are switched on only where a probe agrees, and stay out of evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaMLP, LlamaRMSNorm

from deltatune.config import Config
from deltatune.kernels import fuse
from deltatune.kernels.dropout import SharedDropout
from deltatune.kernels.functions import RMSNorm, SwiGLU


def _grads(fn, *inputs):
    out = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out, torch.autograd.grad((out * weights).sum(), [t for t in inputs if t.requires_grad])


@pytest.mark.parametrize("weight_trains", [True, False])
def test_rms_norm_matches_llamas_forward_and_gradients(weight_trains):
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    norm.weight.requires_grad_(weight_trains)
    x = (torch.randn(3, 7, 48) * 4).requires_grad_()
    plain, plain_grads = _grads(lambda t: norm(t), x)
    ours, our_grads = _grads(lambda t: RMSNorm.apply(t, norm.weight, 1e-5), x)
    assert torch.equal(ours, plain)  # forward to the bit: a run's losses do not move with the kernels
    torch.testing.assert_close(our_grads[0], plain_grads[0], rtol=1e-5, atol=1e-5)
    if weight_trains:
        (w_plain,) = torch.autograd.grad((norm(x) * 2).sum(), [norm.weight])
        (w_ours,) = torch.autograd.grad((RMSNorm.apply(x, norm.weight, 1e-5) * 2).sum(), [norm.weight])
        torch.testing.assert_close(w_ours, w_plain, rtol=1e-5, atol=1e-4)


def test_swiglu_matches_llamas_mlp_forward_and_gradients():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")
    torch.manual_seed(0)
    mlp = LlamaMLP(cfg)
    x = torch.randn(2, 9, 32, requires_grad=True)
    params = [x, *mlp.parameters()]
    plain, plain_grads = _grads(lambda *_: mlp(x), *params)
    ours, our_grads = _grads(lambda *_: mlp.down_proj(SwiGLU.apply(mlp.gate_proj(x), mlp.up_proj(x))), *params)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _tiny_llama_with_lora(dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(cfg)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["q_proj", "v_proj", "up_proj"]))
    for name, p in model.named_parameters():  # B = 0 at init would hide the branches from the gradients
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_model_trains_like_the_plain_one_and_evaluates_with_its_own_forward():
    plain, fused = _tiny_llama_with_lora(), _tiny_llama_with_lora()
    counts = fuse(fused, ["rms_norm", "swiglu"])
    assert counts == {"rms_norm": 5, "swiglu": 2}  # two norms per layer and the final one; one MLP per layer
    assert isinstance(fused.base_model.model.model.norm, LlamaRMSNorm)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    (loss_a, grads_a), (loss_b, grads_b) = _step(plain, ids), _step(fused, ids)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 12
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)
    calls = []
    original = RMSNorm.forward
    RMSNorm.forward = staticmethod(lambda *a: calls.append(1) or original(*a))
    try:
        with torch.no_grad():
            torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    finally:
        RMSNorm.forward = staticmethod(original)
    assert calls == []  # evaluation, generation and export see the modules' own forward
    copy.deepcopy(fused)  # a fused model still copies


def _saved_bytes(model, ids) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(seen.values())


def test_fused_paths_keep_less_for_backward():
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    plain = _saved_bytes(_tiny_llama_with_lora(), ids)
    model = _tiny_llama_with_lora()
    fuse(model, ["rms_norm", "swiglu"])
    fused = _saved_bytes(model, ids)
    tokens, hidden, inner = 4 * 16, 32, 64
    # per layer: one (tokens x inner) tensor fewer in the MLP (the norms keep the same: their weights are frozen)
    assert plain - fused == 4 * tokens * inner * 2
    model = _tiny_llama_with_lora(dropout=0.1)
    plain = _saved_bytes(model, ids)
    fuse(model, ["shared_lora_dropout"])
    # bytes per (token x hidden) element saved: layer 1, q and v: two dropped copies and two float masks (16)
    # become one dropped copy and one boolean mask (5); layer 0, q and v: its input needs no gradient, so no mask
    # is kept, two dropped copies (8) become one (4); up_proj in each layer: a float mask becomes a boolean (3 each)
    assert plain - _saved_bytes(model, ids) == tokens * hidden * (11 + 4 + 3 + 3)


def test_shared_lora_dropout_draws_one_mask_per_input():
    model = _tiny_llama_with_lora(dropout=0.5)
    assert fuse(model, ["shared_lora_dropout"]) == {"shared_lora_dropout": 6}  # q, v, up in 2 layers
    attention = model.base_model.model.model.layers[0].self_attn
    q, v = attention.q_proj, attention.v_proj
    assert isinstance(q.lora_dropout["default"], SharedDropout)
    seen = {}
    for name, layer in (("q", q), ("v", v)):
        layer.lora_A["default"].register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0]))
    model.train()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    model(input_ids=ids)
    assert seen["q"] is seen["v"]  # one dropped tensor for both branches
    x = torch.ones(20000)
    drop = model.base_model.model.model.layers[1].mlp.up_proj.lora_dropout["default"]
    out = drop(x)
    assert set(out.unique().tolist()) == {0.0, 2.0} and abs(float((out == 0).float().mean()) - 0.5) < 0.02
    assert drop(x) is out and drop(x.clone()) is not out  # the same tensor again: the same draw; another: a new one
    x.add_(0)  # changed in place: a new draw
    assert drop(x) is not out
    model.eval()
    assert drop(x) is x
    layer = model.base_model.model.model.layers[1].mlp.up_proj  # a layer rebuilt with peft's own dropout ...
    layer.lora_dropout["default"] = nn.Dropout(0.5)
    assert fuse(model, ["shared_lora_dropout"]) == {"shared_lora_dropout": 1}  # ... switched again, sharing as before
    assert layer.lora_dropout["default"]._last is q.lora_dropout["default"]._last


def test_lora_dropout_trains_as_peft_does_with_the_same_draws_and_keeps_less():
    """The fused branch (dropout and lora_A in one) draws what peft's nn.Dropout draws: under one seed the losses
    are equal to the bit and the gradients to rounding; backward keeps the input once and boolean masks."""
    plain, fused = _tiny_llama_with_lora(dropout=0.1), _tiny_llama_with_lora(dropout=0.1)
    assert fuse(fused, ["lora_dropout"]) == {"lora_dropout": 6}  # q, v, up in 2 layers
    q = fused.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_dropout["default"], nn.Identity) and isinstance(q.lora_A["default"], nn.Linear)
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(2))
    for model in (plain, fused):
        model.train()
    for seed in (7, 8):  # two steps' draws
        torch.manual_seed(seed)
        loss_a, grads_a = _step(plain, ids)
        torch.manual_seed(seed)
        loss_b, grads_b = _step(fused, ids)
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) == 12
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)
    torch.manual_seed(9)
    _step(plain, ids)
    torch.manual_seed(1)  # another draw: another loss (dropout still happens)
    assert not torch.equal(_step(fused, ids)[0], _step(plain, ids)[0])
    with torch.no_grad():  # still in training mode without gradients: the same dropout
        torch.manual_seed(3)
        a = plain(input_ids=ids).logits
        torch.manual_seed(3)
        assert torch.equal(fused(input_ids=ids).logits, a)
    for model in (plain, fused):
        model.eval()
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    plain.train(), fused.train()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    tokens, hidden = 4 * 16, 32
    # bytes per (token x hidden) element: layer 1, q and v: two float masks and two dropped copies (16) become the
    # input once and two boolean masks (6); layer 0, q and v: its input needs no gradient, so peft keeps no mask,
    # two dropped copies (8) become the input and two masks (6); up_proj in each layer: mask and copy (8) become
    # the input and a mask (5). (The norms' outputs, these inputs, are not kept by the norms themselves.)
    saved = _saved_bytes(plain, ids) - _saved_bytes(fused, ids)
    assert saved == tokens * hidden * ((16 - 6) + (8 - 6) + 2 * (8 - 5)), saved / (tokens * hidden)
    assert fuse(fused, ["lora_dropout"]) == {"lora_dropout": 0}  # again: nothing left to switch


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_dropped_linear_gives_autograd_s_gradients(bf16):
    from deltatune.kernels.functions import DroppedLinear

    x = torch.randn(3, 5, 16, requires_grad=True, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 16, requires_grad=True, generator=torch.Generator().manual_seed(1))
    noise = torch.empty_like(x).bernoulli_(0.9, generator=torch.Generator().manual_seed(2)).div_(0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ours, plain = DroppedLinear.apply(x, w, noise, 0.1), torch.nn.functional.linear(x * noise, w)
    assert ours.dtype == plain.dtype and torch.equal(ours, plain)
    for a, b in zip(torch.autograd.grad(ours.float().sum(), [x, w]), torch.autograd.grad(plain.float().sum(), [x, w])):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_dora_branches_keep_their_own_dropout():
    from peft import LoraConfig, get_peft_model

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_dropout=0.1, use_dora=True,
                                                             target_modules=["q_proj"]))
    assert fuse(model, ["lora_dropout"]) == {"lora_dropout": 0}


class GemmaStyleRMSNorm(nn.Module):
    """Scales by 1 + weight: not Llama's maths, so the probe must leave it alone."""

    def __init__(self, width: int):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.zeros(width)), 1e-6

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def test_probe_leaves_modules_with_other_maths_alone():
    model = nn.Sequential(GemmaStyleRMSNorm(16), LlamaRMSNorm(16))
    assert fuse(model, ["rms_norm"]) == {"rms_norm": 1}
    assert type(model[0]) is GemmaStyleRMSNorm and type(model[1]) is not LlamaRMSNorm


def test_unknown_kernel_is_refused_by_name():
    cfg = Config()
    cfg.train.kernels = ["rms_norm", "flash"]
    problems = cfg.train.problems()
    assert any("train.kernels: unknown fused path 'flash'" in p and "swiglu" in p for p in problems)


FREED_SHARE = """
import sys, torch
from deltatune.allocator import return_freed_memory
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))
if sys.argv[1] == "fixed":
    assert return_freed_memory()
torch.ones(4 << 20).sum()  # a 16 MiB tensor freed: glibc raises its threshold above the next ones (as a first step does)
blocks = [torch.ones(2 << 20) for _ in range(16)]  # 16 x 8 MiB, each written
later = torch.ones(2 << 20)  # alive after them, as the activations kept for backward are
held = rss()
del blocks
print((held - rss()) / 128)
"""


@pytest.mark.skipif(not __import__("platform").libc_ver()[0] == "glibc", reason="glibc's malloc only")
def test_freed_activations_go_back_to_the_system():
    import subprocess
    import sys

    def freed_share(mode: str) -> float:  # a fresh process each: malloc's state is process-wide
        out = subprocess.run([sys.executable, "-c", FREED_SHARE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout)

    assert freed_share("glibc") < 0.2  # glibc's raised threshold: the heap keeps them
    assert freed_share("fixed") > 0.9  # deltatune's: given back
