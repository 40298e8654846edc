"""deltatune's fused paths: the same maths as a model's own modules with less kept for backward.

``fuse(model, kinds)`` switches a model's modules to them in place, each kind where it applies
(``train.kernels``: rms_norm, swiglu and lora_dropout by default, shared_lora_dropout on request):

- ``rms_norm``: RMSNorm layers (Llama, Qwen2, Mistral, SmolLM2 ...) through ``functions.RMSNorm``;
- ``swiglu``: gated MLPs ``down(silu(gate(x)) * up(x))`` through ``functions.SwiGLU``;
- ``lora_dropout``: a LoRA branch's dropout and ``lora_A`` in one, the same draws as peft's, keeping a boolean
  mask and the branch's input (shared by the branches that read it) instead of a float mask and a dropped copy;
- ``shared_lora_dropout``: LoRA branches reading the same tensor share one dropout mask (``dropout.py``).

A module is switched only after a probe shows that it computes what the fused path computes (a Gemma-style
RMSNorm that scales by ``1 + weight``, or an MLP with another activation, keeps its own forward). The fused
forward runs only when a gradient is being recorded; evaluation, generation and export see each module's own
forward. All of a model family's fused paths live here, one place to add the next family's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import KERNELS as KINDS
from .dropout import fuse_lora_dropout, share_lora_dropout
from .functions import RMSNorm, SwiGLU


class _FusedRMSNorm:
    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return RMSNorm.apply(x, self.weight, self._fused_eps)
        return super().forward(x)


class _FusedSwiGLU:
    def forward(self, x):
        if torch.is_grad_enabled():
            return self.down_proj(SwiGLU.apply(self.gate_proj(x), self.up_proj(x)))
        return super().forward(x)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _switch(module: nn.Module, fused: type) -> None:
    """Give ``module`` the fused forward by making its class a subclass of its own with ``fused`` first."""
    cls = type(module)
    if issubclass(cls, fused):
        return
    if (cls, fused) not in _SUBCLASSES:
        _SUBCLASSES[cls, fused] = type(cls.__name__, (fused, cls), {"__module__": cls.__module__})
    module.__class__ = _SUBCLASSES[cls, fused]


def _probe_input(module: nn.Module, width: int) -> torch.Tensor:
    floats = [p for p in module.parameters() if p.is_floating_point()]  # a 4-bit base's weights are not
    dtype, device = (floats[0].dtype, floats[0].device) if floats else (torch.float32, next(module.parameters()).device)
    return torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)


def _same(module: nn.Module, fused, x: torch.Tensor) -> bool:
    training = module.training
    module.eval()  # no dropout in the probe
    try:
        with torch.no_grad():
            own, ours = module(x), fused(x)
    finally:
        module.train(training)
    return own.shape == ours.shape and torch.allclose(own, ours, rtol=1e-4, atol=1e-5)


def _rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, nn.Parameter) or weight.dim() != 1
            or not isinstance(eps, float) or getattr(module, "bias", None) is not None):
        return False
    if not _same(module, lambda x: RMSNorm.apply(x, weight, eps), _probe_input(module, weight.numel())):
        return False
    module._fused_eps = eps
    _switch(module, _FusedRMSNorm)
    return True


def _swiglu(module: nn.Module) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if any(part is None for part in parts) or not isinstance(parts[2], nn.Module):
        return False
    width = getattr(parts[0], "in_features", None)
    if not isinstance(width, int):
        return False
    gate, up, down, _ = parts
    if not _same(module, lambda x: down(SwiGLU.apply(gate(x), up(x))), _probe_input(module, width)):
        return False
    _switch(module, _FusedSwiGLU)
    return True


def fuse(model: nn.Module, kinds: list[str] | tuple[str, ...] = KINDS) -> dict[str, int]:
    """Switch ``model``'s modules to the fused paths of ``kinds``; returns how many modules each kind took."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown fused kernels {unknown}; known: {', '.join(KINDS)}")
    counts = dict.fromkeys(kinds, 0)
    for module in list(model.modules()):
        if "rms_norm" in kinds and _rms_norm(module):
            counts["rms_norm"] += 1
        elif "swiglu" in kinds and _swiglu(module):
            counts["swiglu"] += 1
    if "shared_lora_dropout" in kinds:  # before lora_dropout, which leaves shared dropouts alone
        counts["shared_lora_dropout"] = share_lora_dropout(model)
    if "lora_dropout" in kinds:
        counts["lora_dropout"] = fuse_lora_dropout(model, _switch)
    return counts
