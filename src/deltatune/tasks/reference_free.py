"""ORPO (Hong et al. 2024) and SimPO (Meng et al. 2024): preference pairs train a causal-LM policy
with no reference model. Only the policy is in memory and nothing is computed before training
(``needs_reference`` is false), unlike dpo.

Both score a response by its per-token mean log-probability ``log p(y|x) / |y|`` over the response
tokens (the prompt is masked as in SFT and dpo). A batch (``data.collate.collate_pairs``) holds the
chosen sequences of its pairs, then the rejected ones, so one forward pass scores both; with
``train.chunked_loss`` only response positions go through the vocabulary projection
(``dpo.batch_logps``). The objectives are ``rlhf.losses.orpo_loss`` and ``rlhf.losses.simpo_loss``:

- orpo: ``-log p(y_w|x)/|y_w| - orpo.lam * log sigmoid(log odds(y_w) - log odds(y_l))`` per pair;
- simpo: ``-log sigmoid(simpo.beta * (log p(y_w|x)/|y_w| - log p(y_l|x)/|y_l|) - simpo.gamma)``;

with ``log odds(y) = log(q / (1 - q))`` of the per-token mean probability ``q = exp(log p(y|x)/|y|)``.

Evaluation on held-out pairs reports the loss, ``accuracy`` (the share of pairs whose chosen
response the task's own score puts above the rejected one: a positive log odds ratio for orpo, a
larger reward for simpo; both mean a higher per-token mean log-probability), ``margin`` (the mean
log odds ratio for orpo, the mean reward margin ``beta * (...)`` for simpo), the mean per-token
log-probabilities of chosen and rejected responses, and for orpo ``nll``, its SFT term.

The main metric is the held-out loss, as for dpo: accuracy saturates early on easy pairs while the
objective keeps improving, and for orpo the loss also holds the chosen responses' likelihood.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy
from ..rlhf.losses import orpo_loss, simpo_loss
from .common import evaluating, to_device
from .dpo import PolicyPairs, batch_logps
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")


class ReferenceFree(PolicyPairs):
    """What orpo and simpo share: per-token mean log-probabilities of each pair, one objective of them."""

    def objective(self, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(loss averaged over the pairs, each pair's margin, its detached SFT term or None) from each pair's
        per-token mean log-probabilities; a positive margin means the chosen response scores higher."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, int]:
        """(loss summed over the batch's pairs, number of pairs)."""
        logps = batch_logps(model, batch["inputs"], batch["targets"]["labels"], self.chunked, average=True)
        n = logps.shape[0] // 2
        loss, _, _ = self.objective(logps[:n], logps[n:])
        return loss * n, n

    def pair_logps(self, model: nn.Module, examples: list) -> Tensor:
        """``(pairs, 2)``: the per-token mean log-probability of each pair's chosen and rejected response."""
        out = torch.empty(len(examples), 2)
        with evaluating(model) as device:
            for batch, index in self.batches(examples):
                batch = to_device(batch, device)
                logps = batch_logps(model, batch["inputs"], batch["targets"]["labels"], self.chunked, average=True)
                out[index] = logps.float().cpu().view(2, -1).T
        return out

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        logps = self.pair_logps(model, examples)
        loss, margin, nll = self.objective(logps[:, 0], logps[:, 1])
        mean = logps.mean(0)
        return {"loss": float(loss), "accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
                **({} if nll is None else {"nll": float(nll)}), "chosen_logp": float(mean[0]),
                "rejected_logp": float(mean[1]), "pairs": len(examples)}


@register
class ORPO(ReferenceFree):
    name = "orpo"
    summary = "preference pairs -> policy, no reference (ORPO: SFT + odds ratio)"

    def objective(self, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss, nll, log_odds_ratio = orpo_loss(chosen, rejected, self.cfg.orpo.lam)
        return loss, log_odds_ratio, nll


@register
class SimPO(ReferenceFree):
    name = "simpo"
    summary = "preference pairs -> policy, no reference (SimPO: length-normalised reward margin)"

    def objective(self, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor, None]:
        loss, chosen_rewards, rejected_rewards = simpo_loss(chosen, rejected, self.cfg.simpo.beta, self.cfg.simpo.gamma)
        return loss, chosen_rewards - rejected_rewards, None  # the margin: the reward margin, without gamma
