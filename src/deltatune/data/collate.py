"""Batching: dynamic padding to the longest example in the batch (no wasted fixed-length padding)."""

from __future__ import annotations

import torch

from .examples import IGNORE


def collate(examples: list[dict], pad_id: int) -> dict:
    """-> {"inputs": kwargs for the model, "targets": labels tensor, "tokens": real tokens}."""
    if "features" in examples[0]:  # feature extraction: the encoder already ran
        inputs = {"features": torch.stack([e["features"] for e in examples])}
        return {"inputs": inputs, "targets": torch.tensor([e["label"] for e in examples]),
                "tokens": sum(len(e["input_ids"]) for e in examples)}
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[row, : len(e["input_ids"])] = 1
    if "labels" in examples[0]:  # per-token targets (causal LM, tagging, seq2seq), padding ignored
        target_width = max(len(e["labels"]) for e in examples)  # seq2seq targets have their own length
        targets = torch.full((len(examples), target_width), IGNORE, dtype=torch.long)
        for row, e in enumerate(examples):
            targets[row, : len(e["labels"])] = torch.tensor(e["labels"])
    else:
        targets = torch.tensor([e["label"] for e in examples])
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if "position_ids" in examples[0]:  # packed rows (data/pack.py)
        # transformers builds the block-diagonal mask only when attention_mask is None. Right padding
        # needs no mask anyway: under a causal mask no real token attends to a later position.
        inputs = {"input_ids": input_ids, "position_ids": packed_positions(examples, width)}
    return {"inputs": inputs, "targets": targets, "tokens": int(mask.sum())}


def packed_positions(examples: list[dict], width: int) -> torch.Tensor:
    """The rows' position ids; the padding after a row restarts at 0, so it is a segment of its own."""
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["position_ids"])
        positions[row, :n] = torch.tensor(e["position_ids"])
        positions[row, n:] = torch.arange(width - n)
    return positions
