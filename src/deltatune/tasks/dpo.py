"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on a causal-LM policy.

The reference is the base model. Its log-probabilities of every example are computed once,
before training, by the same model with the method's delta switched off (``Method.untouched``:
for an adapter the untouched model computes exactly the base), and stored in the examples
(``with_reference``); no second copy of the model is kept and the reference never runs again.

Log-probabilities cover the response tokens only (the prompt is masked as in SFT). A batch
(``data.collate.collate_pairs``) holds the chosen sequences of its pairs, then the rejected ones,
so one forward pass scores both. With ``train.chunked_loss`` only response positions go through
the vocabulary projection, a chunk of tokens at a time, as ``losses.chunked_causal_lm_loss`` does.

Evaluation reports the DPO loss, ``margin`` = the mean implicit reward margin
``beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))`` on held-out pairs,
``accuracy`` = the share of those pairs whose margin is above 0, and the mean change of the
chosen and rejected log-probabilities from the reference. Both evaluation and the reference use
``pair_logps`` with the same batches, so before training every margin is exactly 0.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from ..data.collate import collate_pairs
from ..data.examples import encode_pairs
from ..errors import DeltatuneError
from ..lazy import lazy
from ..losses import CHUNK_TOKENS, IGNORE
from ..rlhf.losses import dpo_loss, sequence_logps
from .base import Metric
from .causal_lm import generate
from .common import decoder_parts, evaluating, forward, to_device
from .preferences import PreferenceTask
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")
torch_checkpoint = lazy("torch.utils.checkpoint")


def batch_logps(model: nn.Module, inputs: dict, labels: Tensor, chunked: bool, average: bool) -> Tensor:
    """Log-probability of each row's labelled tokens, ``(rows,)`` (per-token mean if ``average``)."""
    parts = decoder_parts(model) if chunked else None
    if parts is None:
        return sequence_logps(forward(model, inputs, labels), labels, average)
    body, head = parts
    hidden = body(**inputs, use_cache=False).last_hidden_state
    return chunked_sequence_logps(hidden, head, labels, average)


def chunked_sequence_logps(hidden: Tensor, head, labels: Tensor, average: bool = False,
                           chunk_tokens: int = CHUNK_TOKENS) -> Tensor:
    """``sequence_logps(head(hidden), labels, average)`` projecting only labelled positions, a chunk
    at a time (checkpointed under autograd, so a chunk's logits are recomputed in backward)."""
    shifted = labels[:, 1:]
    keep = shifted != IGNORE
    rows, targets, owner = hidden[:, :-1][keep], shifted[keep], keep.nonzero()[:, 0]
    token_logps = partial(_token_logps, head)
    grad = torch.is_grad_enabled()
    parts = []
    for start in range(0, len(targets), chunk_tokens):
        args = (rows[start:start + chunk_tokens], targets[start:start + chunk_tokens])
        part = torch_checkpoint.checkpoint(token_logps, *args, use_reentrant=False) if grad else token_logps(*args)
        parts.append(part)
    total = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    if parts:
        total = total.index_add(0, owner, torch.cat(parts))
    return total / keep.sum(-1).clamp(min=1) if average else total


def _token_logps(head, rows: Tensor, targets: Tensor) -> Tensor:
    logits = head(rows).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


class PolicyPairs(PreferenceTask):
    """What the tasks that tune a policy on preference pairs share (dpo, orpo, simpo): a causal LM, each pair
    encoded as its chosen and rejected sequence, batched chosen-first; ``predict`` generates."""
    # Not the preference accuracy: it saturates early while the margins keep growing.
    main_metric = Metric("loss", maximize=False)
    head, peft_type, generates = "causal", "CAUSAL_LM", True

    def encode(self, prefs, tokenizer) -> list:
        return encode_pairs(prefs, tokenizer, self.cfg)

    def length(self, example) -> int:
        return len(example["chosen"]["input_ids"]) + len(example["rejected"]["input_ids"])

    def collate(self, examples: list) -> dict:
        return collate_pairs(examples, self.pad_id)

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        return generate(model, tokenizer, texts, self.cfg.data.chat_template, max_new_tokens)


@register
class DPO(PolicyPairs):
    name = "dpo"
    summary = "preference pairs -> policy (DPO / IPO)"
    needs_reference = True

    @property
    def average(self) -> bool:
        return self.cfg.dpo.loss == "ipo"  # IPO compares per-token means, DPO sums

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, int]:
        """(DPO loss summed over the batch's pairs, number of pairs)."""
        targets = batch["targets"]
        if "reference" not in targets:
            raise DeltatuneError("dpo: the examples have no reference log-probabilities; compute them first with "
                                 "Task.with_reference (train.run.build_job does)")
        logps = batch_logps(model, batch["inputs"], targets["labels"], self.chunked, self.average)
        n, ref = logps.shape[0] // 2, targets["reference"]
        loss, _, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.cfg.dpo.beta, self.cfg.dpo.loss)
        return loss * n, n

    def pair_logps(self, model: nn.Module, examples: list) -> Tensor:
        """``(pairs, 2)``: the model's log-probabilities of each pair's chosen and rejected response."""
        out = torch.empty(len(examples), 2)
        with evaluating(model) as device:
            for batch, index in self.batches(examples):
                batch = to_device(batch, device)
                logps = batch_logps(model, batch["inputs"], batch["targets"]["labels"], self.chunked, self.average)
                out[index] = logps.float().cpu().view(2, -1).T
        return out

    def with_reference(self, reference: nn.Module, examples: list) -> list:
        """The examples with ``reference``: (chosen, rejected) log-probabilities under the base model."""
        if not examples:
            return examples
        logps = self.pair_logps(reference, examples)
        return [{**e, "reference": (c, r)} for e, (c, r) in zip(examples, logps.tolist())]

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        policy = self.pair_logps(model, examples)
        ref = torch.tensor([e["reference"] for e in examples], dtype=torch.float32)
        loss, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.cfg.dpo.beta,
                                          self.cfg.dpo.loss)
        margin = chosen - rejected
        change = (policy - ref).mean(0)
        return {"loss": float(loss), "accuracy": float((margin > 0).float().mean()),
                "margin": float(margin.mean()), "chosen_logp_change": float(change[0]),
                "rejected_logp_change": float(change[1]), "pairs": len(examples)}
