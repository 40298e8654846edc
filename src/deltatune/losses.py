"""Losses as pure functions of tensors. Each returns (sum of per-item losses, number of items)
so callers can average over exactly the items that count, across micro-batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def classification_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy over classes: ``-log softmax(z)_y`` summed over the batch."""
    return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()


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


def token_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Cross-entropy at every position with a label (token tagging; seq2seq decoder outputs,
    which are already aligned with their targets). -100 labels are skipped; soft-prompt
    positions at the front, if any, are dropped as in ``causal_lm_loss``."""
    logits = logits[:, -labels.shape[1]:]
    count = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, count
