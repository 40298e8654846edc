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

from typing import TYPE_CHECKING

from ..data.collate import collate_rankings, pad
from ..data.examples import encode_rankings, reward_ids
from ..errors import RunError
from ..lazy import lazy
from ..rlhf.losses import listwise_loss, pairwise_accuracy, pairwise_loss
from .base import Metric
from .common import evaluating, to_device
from .preferences import PreferenceTask
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")


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


@register
class Reward(PreferenceTask):
    name = "reward"
    summary = "prompt + response -> a scalar score, from preferences"
    main_metric = Metric("accuracy", maximize=True)
    head, peft_type, new_head, scores_responses = "sequence", "SEQ_CLS", True, True

    def head_labels(self) -> list[str]:
        return ["reward"]  # one output: the scalar reward

    def encode(self, prefs, tokenizer) -> list:
        return encode_rankings(prefs, tokenizer, self.cfg)

    def length(self, example) -> int:
        return sum(len(ids) for ids in example["responses"])

    def collate(self, examples: list) -> dict:
        return collate_rankings(examples, self.pad_id)

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, int]:
        return ranking_loss(rewards(model, batch["inputs"]), batch["targets"]["sizes"], self.cfg.reward.loss)

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        scores, sizes = [], []
        with evaluating(model) as device:
            for batch, _ in self.batches(examples):
                scores.append(rewards(model, to_device(batch, device)["inputs"]).cpu())
                sizes.append(batch["targets"]["sizes"])
        scores, sizes = torch.cat(scores), torch.cat(sizes)
        total, count = ranking_loss(scores, sizes, self.cfg.reward.loss)
        better, worse = pair_index(sizes)
        return {"loss": float(total) / count, "accuracy": float(pairwise_accuracy(scores[better], scores[worse])),
                "margin": float((scores[better] - scores[worse]).mean()), "pairs": len(better),
                "rankings": len(sizes)}

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        raise RunError("a reward model scores a prompt and a response together; use "
                       "deltatune.inference.score(loaded, prompts, responses)")

    def score(self, model: nn.Module, tokenizer, prompts: list[str], responses: list[str]) -> list[float]:
        """Each (prompt, response)'s score, formatted and truncated as in training."""
        ids = self.pair_ids(tokenizer, prompts, responses)
        out: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            out += response_scores(model, tokenizer.pad_token_id, ids[start:start + self.batch_size])
        return out

    def pair_ids(self, tokenizer, prompts: list[str], responses: list[str]) -> list[list[int]]:
        """The token ids a reward model reads for each (prompt, response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses; give one response "
                             "per prompt")
        return reward_ids(tokenizer, prompts, responses, self.cfg.data.chat_template, self.cfg.train.max_length)


def response_scores(model: nn.Module, pad_id: int, ids: list[list[int]]) -> list[float]:
    """The reward of each token-id list, in one right-padded batch."""
    with torch.no_grad():
        device = next(model.parameters()).device
        input_ids, mask = pad(ids, pad_id)
        return rewards(model, {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}).cpu().tolist()
