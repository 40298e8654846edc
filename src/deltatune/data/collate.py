"""Batching: dynamic padding to the longest example in the batch (no wasted fixed-length padding).

One collator per example type (``data.examples``); each task says which it uses. A batch is
``{"inputs": kwargs for the model, "targets": what the loss compares with, "tokens": real tokens}``.
Preference examples become one batch of texts each, so a single forward pass scores them all:
a reward batch stacks every response of every ranking (best first within a ranking); a DPO batch
stacks the chosen sequences of all its pairs, then the rejected ones.
"""

from __future__ import annotations

from ..lazy import lazy
from .examples import IGNORE, LabelledText, Pair, Ranking, TokenTargets

torch = lazy("torch")


def pad(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(n, longest)`` tensor of the sequences and its 0/1 mask of real entries."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        out[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return out, mask


def collate(examples: list[TokenTargets], pad_id: int) -> dict:
    """Per-token targets (causal LM, tagging, seq2seq), padding ignored; packed rows keep their positions."""
    input_ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    targets = pad([e["labels"] for e in examples], IGNORE)[0]  # seq2seq targets have their own length
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if "position_ids" in examples[0]:  # packed rows (data/pack.py)
        # transformers builds the block-diagonal mask only when attention_mask is None. Right padding
        # needs no mask anyway: under a causal mask no real token attends to a later position.
        inputs = {"input_ids": input_ids, "position_ids": packed_positions(examples, input_ids.shape[1])}
    return {"inputs": inputs, "targets": targets, "tokens": int(mask.sum())}


def collate_labelled(examples: list[LabelledText], pad_id: int) -> dict:
    """One class index per text; texts whose pooled ``features`` a method computed once skip the encoder."""
    labels = torch.tensor([e["label"] for e in examples])
    tokens = sum(len(e["input_ids"]) for e in examples)
    if "features" in examples[0]:  # feature extraction: the encoder already ran
        return {"inputs": {"features": torch.stack([e["features"] for e in examples])}, "targets": labels,
                "tokens": tokens}
    input_ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": labels, "tokens": tokens}


def collate_rankings(examples: list[Ranking], pad_id: int) -> dict:
    """Reward examples (``responses``: token ids per response, best first). ``targets["sizes"]``
    says how many consecutive rows of the batch belong to each ranking."""
    input_ids, mask = pad([ids for e in examples for ids in e["responses"]], pad_id)
    targets = {"sizes": torch.tensor([len(e["responses"]) for e in examples])}
    return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": targets, "tokens": int(mask.sum())}


def collate_pairs(examples: list[Pair], pad_id: int) -> dict:
    """DPO examples: rows 0..n-1 are the chosen sequences, rows n..2n-1 the rejected ones.
    ``targets["reference"]`` holds the reference log-probabilities in the same order (once computed)."""
    rows = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    input_ids, mask = pad([r["input_ids"] for r in rows], pad_id)
    targets = {"labels": pad([r["labels"] for r in rows], IGNORE)[0]}
    if "reference" in examples[0]:
        targets["reference"] = torch.tensor([e["reference"][0] for e in examples] +
                                            [e["reference"][1] for e in examples], dtype=torch.float32)
    return {"inputs": {"input_ids": input_ids, "attention_mask": mask}, "targets": targets, "tokens": int(mask.sum())}


def packed_positions(examples: list[TokenTargets], width: int) -> torch.Tensor:
    """The rows' position ids; the padding after a row restarts at 0, so it is a segment of its own."""
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["position_ids"])
        positions[row, :n] = torch.tensor(e["position_ids"])
        positions[row, n:] = torch.arange(width - n)
    return positions
