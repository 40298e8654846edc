"""Losses as pure functions of tensors. Each returns (sum of per-item losses, number of items)
so callers can average over exactly the items that count, across micro-batches."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

from .lazy import lazy

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")
F = lazy("torch.nn.functional")
torch_checkpoint = lazy("torch.utils.checkpoint")

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
    padding never do), ``chunk_tokens`` at a time. A plain ``nn.Linear`` head (in fp32 or under
    autocast) takes ``linear_cross_entropy``: each chunk's gradients are computed as soon as its
    logits are, so backward neither keeps nor recomputes them. Any other head (a LoRA-wrapped one)
    has each chunk checkpointed: its logits are recomputed in backward instead of kept.
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
    if grad and type(head) is torch.nn.Linear:
        return linear_cross_entropy(rows, head.weight, head.bias, targets, chunk_tokens), count
    chunk_loss = partial(_summed_cross_entropy, head)
    total = None
    for start in range(0, count, chunk_tokens):
        args = (rows[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        part = torch_checkpoint.checkpoint(chunk_loss, *args, use_reentrant=False) if grad else chunk_loss(*args)
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
    from .fused_cross_entropy import LinearCrossEntropy

    return LinearCrossEntropy.apply(rows, weight, bias, targets, chunk_tokens)


def token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy at every position with a label (token tagging; seq2seq decoder outputs,
    which are already aligned with their targets). -100 labels are skipped; soft-prompt
    positions at the front, if any, are dropped as in ``causal_lm_loss``."""
    logits = logits[:, -labels.shape[1]:]
    count = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, count
