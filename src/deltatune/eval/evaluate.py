"""Evaluate a model on prepared examples: loss plus the task's metrics."""

from __future__ import annotations

import torch
from torch import nn

from ..data.collate import collate
from ..losses import IGNORE, causal_lm_loss, classification_loss, token_loss
from .metrics import classification_metrics, perplexity


def loss_fn(task: str):
    return {"classification": classification_loss, "causal_lm": causal_lm_loss,
            "token_classification": token_loss, "seq2seq": token_loss}[task]


def forward(model: nn.Module, inputs: dict, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Logits for a batch. An encoder-decoder reads its targets shifted right (teacher forcing)."""
    if task == "seq2seq":
        inputs = {**inputs, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=targets)}
    if "position_ids" in inputs:  # packed rows (data/pack.py)
        # transformers looks for packed segments only without a KV cache, and a decoder whose config
        # has use_cache=True makes one on every call, in training too: the examples would then see
        # each other.
        inputs = {**inputs, "use_cache": False}
    return model(**inputs).logits


def tagged_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list[int], list[int]]:
    """(true, predicted) tag indices at the positions that carry a label."""
    logits = logits[:, -targets.shape[1]:]
    keep = targets != IGNORE
    return targets[keep].tolist(), logits.argmax(-1)[keep].tolist()


def batches(examples: list[dict], batch_size: int, pad_id: int):
    # Sorted by length: evaluation order does not matter and padding costs time.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id), order[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, batch_size: int, pad_id: int,
             labels: list[str] | None = None) -> dict:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    y_true, y_pred = [], []
    for batch, _ in batches(examples, batch_size, pad_id):
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        targets = batch["targets"].to(device)
        logits = forward(model, inputs, targets, task)
        loss, n = loss_fn(task)(logits, targets)
        total, count = total + float(loss), count + n
        if task == "classification":
            y_true += targets.tolist()
            y_pred += logits.argmax(-1).tolist()
        elif task == "token_classification":
            true, pred = tagged_predictions(logits, targets)
            y_true, y_pred = y_true + true, y_pred + pred
    model.train(was_training)
    mean = total / max(count, 1)
    if task in ("classification", "token_classification"):  # per-example or per-word (tag) metrics
        return {"loss": mean, **classification_metrics(y_true, y_pred, labels)}
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}
