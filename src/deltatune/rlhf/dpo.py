"""DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023) on a causal-LM policy.

The reference is the base model. Its log-probabilities of every example are computed once,
before training, by the same model with the method's delta switched off (``Method.untouched``:
for an adapter the untouched model computes exactly the base), and stored in the examples; no
second copy of the model is kept and the reference never runs again.

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

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..errors import DeltatuneError
from ..eval.evaluate import batches, decoder_parts, forward
from ..losses import CHUNK_TOKENS, IGNORE
from .losses import dpo_loss, sequence_logps


def batch_logps(model: nn.Module, inputs: dict, labels: Tensor, chunked: bool, average: bool) -> Tensor:
    """Log-probability of each row's labelled tokens, ``(rows,)`` (per-token mean if ``average``)."""
    parts = decoder_parts(model) if chunked else None
    if parts is None:
        return sequence_logps(forward(model, inputs, labels, "causal_lm"), labels, average)
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
        parts.append(checkpoint(token_logps, *args, use_reentrant=False) if grad else token_logps(*args))
    total = hidden.new_zeros(labels.shape[0], dtype=torch.float32)
    if parts:
        total = total.index_add(0, owner, torch.cat(parts))
    return total / keep.sum(-1).clamp(min=1) if average else total


def _token_logps(head, rows: Tensor, targets: Tensor) -> Tensor:
    logits = head(rows).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def forward_loss(model: nn.Module, inputs: dict, targets: dict, chunked: bool = False) -> tuple[Tensor, int]:
    """(DPO loss summed over the batch's pairs, number of pairs)."""
    if "reference" not in targets:
        raise DeltatuneError("dpo: the examples have no reference log-probabilities; compute them first with "
                             "rlhf.dpo.add_reference_logps (train.run.build_job does)")
    goal = targets["objective"]
    logps = batch_logps(model, inputs, targets["labels"], chunked, goal["loss"] == "ipo")
    n, ref = logps.shape[0] // 2, targets["reference"]
    loss, _, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], goal["beta"], goal["loss"])
    return loss * n, n


@torch.no_grad()
def pair_logps(model: nn.Module, examples: list[dict], batch_size: int, pad_id: int, chunked: bool) -> Tensor:
    """``(pairs, 2)``: the model's log-probabilities of each pair's chosen and rejected response."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    average = examples[0]["objective"]["loss"] == "ipo"  # IPO compares per-token means
    out = torch.empty(len(examples), 2)
    for batch, index in batches(examples, batch_size, pad_id):
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        logps = batch_logps(model, inputs, batch["targets"]["labels"].to(device), chunked, average).float().cpu()
        out[index] = logps.view(2, -1).T
    model.train(was_training)
    return out


def add_reference_logps(reference: nn.Module, examples: list[dict], batch_size: int, pad_id: int,
                        chunked: bool) -> list[dict]:
    """The examples with ``reference``: (chosen, rejected) log-probabilities under ``reference``."""
    if not examples:
        return examples
    logps = pair_logps(reference, examples, batch_size, pad_id, chunked)
    return [{**e, "reference": (c, r)} for e, (c, r) in zip(examples, logps.tolist())]


def evaluate(model: nn.Module, examples: list[dict], batch_size: int, pad_id: int, chunked: bool = True) -> dict:
    policy = pair_logps(model, examples, batch_size, pad_id, chunked)
    ref = torch.tensor([e["reference"] for e in examples], dtype=torch.float32)
    goal = examples[0]["objective"]
    loss, chosen, rejected = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], goal["beta"], goal["loss"])
    margin = chosen - rejected
    change = (policy - ref).mean(0)
    return {"loss": float(loss), "accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "chosen_logp_change": float(change[0]), "rejected_logp_change": float(change[1]),
            "pairs": len(examples)}
