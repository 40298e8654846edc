"""Losses as pure functions of tensors. Each returns (sum of per-item losses, number of items)
so callers can average over exactly the items that count, across micro-batches."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE = -100
# Positions per chunk of chunked_causal_lm_loss: SmolLM2's 49,152-word vocabulary makes a
# chunk's fp32 logits 50 MB (the whole 4 x 512 batch: 400 MB), while 256 x hidden x vocab is
# still a large enough matrix product to run at full speed.
CHUNK_TOKENS = 256


def classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy over classes: ``-log softmax(z)_y`` summed over the batch."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()


def masked_classification_loss(logits: Tensor, labels: Tensor, allowed: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy normalised over the classes an example may take: ``allowed[y]`` for true class y
    (multi-task: the labels of its own task, so one task's classes never compete with another's)."""
    logits = logits.float().masked_fill(~allowed.to(logits.device)[labels], float("-inf"))
    return F.cross_entropy(logits, labels, reduction="sum"), labels.numel()


def causal_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Next-token cross-entropy: position t predicts ``labels[t + 1]``; -100 labels are skipped.

    Soft-prompt methods return logits for their virtual tokens first; only the last
    ``labels.shape[1]`` positions belong to the text.
    """
    shifted = labels[:, 1:]
    logits = logits[:, -labels.shape[1]:-1]
    count = int((shifted != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), shifted.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, count


def chunked_causal_lm_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor,
                           chunk_tokens: int = CHUNK_TOKENS) -> tuple[Tensor, int]:
    """``causal_lm_loss(head(hidden), labels)`` without the logits of the whole batch.

    ``hidden`` are the final (normed) hidden states and ``head`` the output projection to the
    vocabulary. Only positions whose next-token label counts go through ``head`` (prompt and
    padding never do), ``chunk_tokens`` at a time. A plain ``nn.Linear`` head outside autocast
    takes ``linear_cross_entropy``: each chunk's gradients are computed as soon as its logits are,
    so backward neither keeps nor recomputes them. Any other head (a LoRA-wrapped one, bf16
    autocast) has each chunk checkpointed: its logits are recomputed in backward instead of kept.
    Either way peak memory is a few copies of one chunk's logits rather than of the whole
    (batch x length x vocabulary) tensor.
    """
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    rows = hidden[:, :-1][keep]  # (targets, hidden), in the same order as the plain loss sums them
    targets = shifted[keep]
    count = int(targets.numel())
    if count == 0:  # keep the graph, as the plain loss does
        return hidden[:, :0].float().sum(), 0
    grad = torch.is_grad_enabled()
    if grad and type(head) is torch.nn.Linear and not torch.is_autocast_enabled(rows.device.type):
        return linear_cross_entropy(rows, head.weight, head.bias, targets, chunk_tokens), count
    chunk_loss = partial(_summed_cross_entropy, head)
    total = None
    for start in range(0, count, chunk_tokens):
        args = (rows[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        part = checkpoint(chunk_loss, *args, use_reentrant=False) if grad else chunk_loss(*args)
        total = part if total is None else total + part
    return total, count


def _summed_cross_entropy(head: Callable[[Tensor], Tensor], rows: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(head(rows).float(), targets, reduction="sum")


def linear_cross_entropy(rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """``F.cross_entropy(F.linear(rows, weight, bias).float(), targets, reduction="sum")`` with its
    gradients computed chunk by chunk in forward (as Liger's fused linear cross-entropy does).

    The gradient of a summed cross-entropy with respect to its logits is ``softmax - one_hot``, so
    forward turns each chunk's logits into that in place and multiplies it out right away into the
    gradients of ``rows`` (and of ``weight`` and ``bias`` where they train). Backward only scales
    them. Against checkpointed chunks this saves one projection to the vocabulary and the separate
    log-softmax / NLL backward passes over the logits.
    """
    return _LinearCrossEntropy.apply(rows, weight, bias, targets, chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_tokens: int) -> Tensor:
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, rows.shape[0], chunk_tokens):
            x, y = rows[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            logits = F.linear(x, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(y.numel(), device=y.device), y] -= 1.0  # minus one_hot: d loss / d logits
            g = probs.to(x.dtype)
            if need_rows:
                grad_rows[start:start + chunk_tokens] = g @ weight
            if need_weight:
                grad_weight.addmm_(probs.t(), x.float())
            if need_bias:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_rows, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        return (*(None if g is None else g * grad_total for g in ctx.saved_tensors), None, None)


def token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy at every position with a label (token tagging; seq2seq decoder outputs,
    which are already aligned with their targets). -100 labels are skipped; soft-prompt
    positions at the front, if any, are dropped as in ``causal_lm_loss``."""
    logits = logits[:, -labels.shape[1]:]
    count = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, count
