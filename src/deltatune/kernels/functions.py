"""Autograd functions that compute what a transformer's element-wise blocks compute, keeping less for backward.

Each equals the plain module to float rounding, forward and gradients (tests/unit/test_kernels.py checks
them to 1e-5 against transformers' own modules). They save only the inputs backward cannot do without and
recompute the cheap element-wise rest, never a matrix product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class RMSNorm(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x**2) + eps))``, computed in float32 as Llama's RMSNorm does.

    Keeps ``x`` and the per-row ``rsqrt`` (the plain module also keeps the normalised rows and the squares'
    inputs: one activation-sized tensor more per norm)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        h = x.float()
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # as the module does: the same bits forward
        ctx.save_for_backward(x, weight, rstd)
        return weight * (h * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).sum(dim=tuple(range(grad.dim() - 1))).to(weight.dtype)
        grad_normed = (grad * weight).to(x.dtype).float()
        dot = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1).div_(x.shape[-1])
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd)
        return grad_x.to(x.dtype), grad_weight, None


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` (Llama's MLP between its projections). Keeps ``gate`` and ``up`` and recomputes
    ``silu(gate)`` in backward; the plain modules also keep ``silu(gate)``."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


class Dropout(torch.autograd.Function):
    """Inverted dropout (``x * mask / (1 - p)``, each element kept with probability ``1 - p``) that keeps its
    mask as booleans for backward: a quarter of the bytes of the float mask ``F.dropout`` keeps on the CPU."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(mask)
        return x.mul(mask).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None


class DroppedLinear(torch.autograd.Function):
    """``F.linear(x * noise, weight)``: a LoRA branch's dropout (``noise``: 0 or 1 / (1 - p) per element, as
    ``F.dropout`` makes it) and its ``lora_A`` in one. Keeps ``x`` and the mask as booleans, and recomputes
    ``x * noise`` in backward; the plain modules keep the float ``noise`` and the dropped copy."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, noise: Tensor, p: float) -> Tensor:
        ctx.p = p
        ctx.save_for_backward(x, weight, noise.bool())
        return F.linear(x * noise, weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, mask = ctx.saved_tensors
        noise = mask.to(x.dtype).div_(1 - ctx.p)  # the forward's values, to the bit
        grad_x = grad_weight = None
        # under autocast the product ran in a lower precision: so do its gradients, each returned in its input's
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(grad.dtype)).to(x.dtype).mul_(noise)
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).to(grad.dtype)
            grad_weight = (grad.flatten(0, -2).t() @ dropped.flatten(0, -2)).to(weight.dtype)
        return grad_x, grad_weight, None, None
