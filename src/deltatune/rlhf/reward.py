"""Reward models: a sequence classifier with one output scores a prompt and a response.

A batch (``data.collate.collate_rankings``) holds every response of each of its rankings, best
first, so one forward pass scores them all and a ranking's pairs stay in one batch. The loss is
``reward.loss``:

- pairwise: Bradley-Terry, ``-log sigmoid(r_better - r_worse)``, averaged over every pair a ranking
  implies (k responses: k(k-1)/2 pairs, as InstructGPT trains);
- listwise: Plackett-Luce, the negative log-likelihood of each full ranking, averaged over rankings.

Evaluation reports that loss, ``accuracy`` (the share of held-out pairs the model orders the way
people did) and ``margin``, the mean of ``r_better - r_worse`` over those pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..eval.evaluate import batches
from .losses import listwise_loss, pairwise_accuracy, pairwise_loss


def rewards(model: nn.Module, inputs: dict) -> Tensor:
    """One scalar per row of the batch, ``(rows,)``."""
    return model(**inputs).logits[..., 0].float()


def pair_index(sizes: Tensor) -> tuple[Tensor, Tensor]:
    """Row indices (better, worse) of every pair: in a ranking of k rows, row i beats row j for i < j."""
    better, worse, start = [], [], 0
    for k in sizes.tolist():
        for i in range(k):
            better += [start + i] * (k - i - 1)
            worse += range(start + i + 1, start + k)
        start += k
    return torch.tensor(better, dtype=torch.long), torch.tensor(worse, dtype=torch.long)


def ranking_loss(scores: Tensor, sizes: Tensor, loss: str) -> tuple[Tensor, int]:
    """(loss summed over the items that count, their number): pairs for pairwise, rankings for listwise."""
    if loss == "listwise":
        k = torch.arange(int(sizes.max()), device=scores.device)
        mask = k < sizes.to(scores.device)[:, None]  # (rankings, longest): the rows each ranking has
        table = scores.new_zeros(mask.shape).masked_scatter(mask, scores)
        return listwise_loss(table, mask) * len(sizes), len(sizes)
    better, worse = (i.to(scores.device) for i in pair_index(sizes))
    return pairwise_loss(scores[better], scores[worse]) * len(better), len(better)


def forward_loss(model: nn.Module, inputs: dict, targets: dict, chunked: bool = False) -> tuple[Tensor, int]:
    """The reward task's (loss sum, count) for a batch; ``chunked`` does not apply (no vocabulary)."""
    return ranking_loss(rewards(model, inputs), targets["sizes"], targets["objective"]["loss"])


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], batch_size: int, pad_id: int) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores, sizes = [], []
    for batch, _ in batches(examples, batch_size, pad_id):
        scores.append(rewards(model, {k: v.to(device) for k, v in batch["inputs"].items()}).cpu())
        sizes.append(batch["targets"]["sizes"])
    model.train(was_training)
    scores, sizes = torch.cat(scores), torch.cat(sizes)
    total, count = ranking_loss(scores, sizes, examples[0]["objective"]["loss"])
    better, worse = pair_index(sizes)
    return {"loss": float(total) / count, "accuracy": float(pairwise_accuracy(scores[better], scores[worse])),
            "margin": float((scores[better] - scores[worse]).mean()), "pairs": len(better), "rankings": len(sizes)}
