"""What several tasks share: running a model on a batch, the chunked causal-LM path, evaluation order."""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator

from ..lazy import lazy
from ..losses import IGNORE
from ..models import is_sharded

torch = lazy("torch")
nn = lazy("torch.nn")
peft = lazy("peft")


def forward(model: nn.Module, inputs: dict, targets: torch.Tensor, encoder_decoder: bool = False) -> torch.Tensor:
    """Logits for a batch. An encoder-decoder reads its targets shifted right (teacher forcing)."""
    if encoder_decoder:
        inputs = {**inputs, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=targets)}
    if "position_ids" in inputs:  # packed rows (data/pack.py)
        # transformers looks for packed segments only without a KV cache, and a decoder whose config
        # has use_cache=True makes one on every call, in training too: the examples would then see
        # each other.
        inputs = {**inputs, "use_cache": False}
    return model(**inputs).logits


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
    if is_sharded(model):  # FSDP: the whole model's forward gathers the parameters outside the layers
        return None
    lm = model
    if isinstance(model, peft.PeftModel):
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


def batches(examples: list, batch_size: int, collate: Callable[[list], dict],
            length: Callable[[object], int]) -> Iterator[tuple[dict, list[int]]]:
    """(batch, indices of its examples). Sorted by length: evaluation order does not matter and padding costs time."""
    order = sorted(range(len(examples)), key=lambda i: length(examples[i]))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]]), order[start:start + batch_size]


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on ``device`` (nested target dicts included)."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        return {k: move(v) for k, v in value.items()} if isinstance(value, dict) else value
    return {k: move(v) for k, v in batch.items()}


def evaluate_logits(model: nn.Module, batches, loss_of: Callable,
                    each: Callable[[torch.Tensor, torch.Tensor, list[int]], None]) -> float:
    """The mean loss over ``batches`` (``(batch, indices)`` pairs) in evaluation mode; ``each(logits, targets,
    indices)`` sees every batch's logits (and which examples they are), for the task's own metrics."""
    total, count = 0.0, 0
    with evaluating(model) as device:
        for batch, index in batches:
            batch = to_device(batch, device)
            logits = forward(model, batch["inputs"], batch["targets"])
            loss, n = loss_of(logits, batch["targets"])
            total, count = total + float(loss), count + n
            each(logits, batch["targets"], index)
    return total / max(count, 1)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Evaluation mode and no gradients for the block (the mode restored after); yields the model's device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)
