"""Evaluate a model on prepared examples: loss plus the task's metrics.

The preference tasks (reward, dpo) have their own loss and metrics in ``rlhf.reward`` and
``rlhf.dpo``; ``forward_loss`` and ``evaluate`` hand them their batches, so the loop treats
every task alike."""

from __future__ import annotations

import warnings
import weakref
from functools import lru_cache, partial

import torch
from peft import PeftModel
from torch import nn

from ..data.collate import collate, example_length
from ..data.examples import PREFERENCE_TASKS
from ..losses import (IGNORE, causal_lm_loss, chunked_causal_lm_loss, classification_loss,
                      masked_classification_loss, token_loss)
from ..metrics import classification_metrics, multitask_metrics, perplexity, same_task, task_groups


def loss_fn(task: str, labels: list[str] | None = None):
    """The task's loss; with multi-task labels (``<task>/<label>``, data.tasks) a softmax per task."""
    if task == "classification" and labels and task_groups(labels):
        return partial(masked_classification_loss, allowed=_allowed(tuple(labels)))
    return {"classification": classification_loss, "causal_lm": causal_lm_loss,
            "token_classification": token_loss, "seq2seq": token_loss}[task]


@lru_cache(maxsize=8)
def _allowed(labels: tuple[str, ...]) -> torch.Tensor:
    """The multi-task mask (``same_task``), built once per label set, not at every training step."""
    return torch.from_numpy(same_task(list(labels)))


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


def forward_loss(model: nn.Module, inputs: dict, targets: torch.Tensor, task: str,
                 chunked: bool = False, labels: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """The task's (loss sum, count) for a batch.

    ``chunked``: a causal LM's cross-entropy comes from its final hidden states through
    ``losses.chunked_causal_lm_loss``, so the logits of the whole batch never exist. Models it
    does not fit (soft prompts, see ``decoder_parts``) take the plain path.
    """
    if task in PREFERENCE_TASKS:
        return _preference_task(task).forward_loss(model, inputs, targets, chunked)
    parts = decoder_parts(model) if chunked and task == "causal_lm" else None
    if parts is None:
        return loss_fn(task, labels)(forward(model, inputs, targets, task), targets)
    body, head = parts
    hidden = body(**inputs, use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, head, targets)


def _preference_task(task: str):
    from ..rlhf import dpo, reward  # imported here: they build on forward, decoder_parts and batches

    return {"reward": reward, "dpo": dpo}[task]


_VERIFIED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body, output projection) of a causal LM, or None where the loss must use its logits.

    The body is the base transformer (its ``last_hidden_state`` is after the final norm) and the
    projection is whatever ``get_output_embeddings()`` returns, so a LoRA-wrapped ``lm_head``
    works. Soft prompts are refused: their virtual tokens come from peft's own forward. Checked
    once per model on a short input: the logits must equal ``head(body(x))``, which fails for
    models that transform their logits further (e.g. Gemma 2's soft-capping).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):  # its own forward syncs the gradients
        return None
    lm = model
    if isinstance(model, PeftModel):
        if model.active_peft_config.is_prompt_learning:
            return None
        lm = model.get_base_model()
    body = getattr(lm, "base_model", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or not isinstance(body, nn.Module) or body is lm:
        return None
    if model not in _VERIFIED:
        _VERIFIED[model] = _same_logits(model, body, head)
        if not _VERIFIED[model]:
            warnings.warn(f"chunked loss: {type(lm).__name__} does more to its logits than project the "
                          "final hidden states; using the plain loss")
    return (body, head) if _VERIFIED[model] else None


def _same_logits(model: nn.Module, body: nn.Module, head: nn.Module) -> bool:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = (torch.arange(1, 9, device=device) * 7919 % vocab).unsqueeze(0)  # any few tokens will do
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout: both paths must be deterministic
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            plain = model(input_ids=ids, use_cache=False).logits.float()
            chunked = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        for module, training in modes.items():
            module.training = training
    return plain.shape == chunked.shape and torch.allclose(plain, chunked, rtol=1e-4, atol=1e-5)


def tagged_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[list[int], list[int]]:
    """(true, predicted) tag indices at the positions that carry a label."""
    logits = logits[:, -targets.shape[1]:]
    keep = targets != IGNORE
    return targets[keep].tolist(), logits.argmax(-1)[keep].tolist()


def batches(examples: list[dict], batch_size: int, pad_id: int):
    # Sorted by length: evaluation order does not matter and padding costs time.
    order = sorted(range(len(examples)), key=lambda i: example_length(examples[i]))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id), order[start:start + batch_size]


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[dict], task: str, batch_size: int, pad_id: int,
             labels: list[str] | None = None, chunked_loss: bool = True) -> dict:
    """Loss and metrics; ``chunked_loss`` as in ``forward_loss`` (it only saves memory here)."""
    if task == "reward":
        return _preference_task(task).evaluate(model, examples, batch_size, pad_id)
    if task == "dpo":
        return _preference_task(task).evaluate(model, examples, batch_size, pad_id, chunked_loss)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    y_true, y_pred, scores = [], [], []
    for batch, _ in batches(examples, batch_size, pad_id):
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        targets = batch["targets"].to(device)
        if task not in ("classification", "token_classification"):  # only the loss is needed
            loss, n = forward_loss(model, inputs, targets, task, chunked_loss)
            total, count = total + float(loss), count + n
            continue
        logits = forward(model, inputs, targets, task)
        loss, n = loss_fn(task, labels)(logits, targets)
        total, count = total + float(loss), count + n
        if task == "classification":
            y_true += targets.tolist()
            y_pred += logits.argmax(-1).tolist()
            scores.append(logits.float().cpu())
        else:
            true, pred = tagged_predictions(logits, targets)
            y_true, y_pred = y_true + true, y_pred + pred
    model.train(was_training)
    mean = total / max(count, 1)
    if task == "classification" and task_groups(labels):  # one model, several tasks (data.tasks)
        return {"loss": mean, **multitask_metrics(y_true, torch.cat(scores).numpy(), labels)}
    if task in ("classification", "token_classification"):  # per-example or per-word (tag) metrics
        return {"loss": mean, **classification_metrics(y_true, y_pred, labels)}
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}
