"""The autograd function behind ``losses.linear_cross_entropy`` (see its docstring): summed
cross-entropy over a linear projection, with the gradients computed chunk by chunk in forward.
A module of its own so that importing ``losses`` does not import torch.

Under autocast the products run in its dtype as autocast would run them (the inputs rounded to bf16, fp32
softmax), with the weight cast once for all chunks instead of once per product."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_tokens: int) -> Tensor:
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        device = rows.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype
        w = weight.to(compute)  # once for all chunks (autocast would cast it at every product)
        b = None if bias is None else bias.to(compute)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        with torch.autocast(device, enabled=False):  # the products below are already in `compute`
            for start in range(0, rows.shape[0], chunk_tokens):
                x, y = rows[start:start + chunk_tokens].to(compute), targets[start:start + chunk_tokens]
                logits = F.linear(x, w, b).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(y.numel(), device=y.device), y] -= 1.0  # minus one_hot: d loss / d logits
                g = probs.to(compute)
                if need_rows:
                    grad_rows[start:start + chunk_tokens] = g @ w
                if need_weight:
                    grad_weight += g.t() @ x
                if need_bias:
                    grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_rows, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        return (*(None if g is None else g * grad_total for g in ctx.saved_tensors), None, None)
