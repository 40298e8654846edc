"""Full fine-tuning: every weight trains; the delta is the whole model (saved in HF format)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import Method, set_trainable
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn


@register
class Full(Method):
    name = "full"
    can_merge = True  # nothing to merge: the tuned weights are the model
    summary = "every parameter trains"
    default_lr = 2e-5  # Devlin et al. 2019 (BERT), fine-tuning grid 2e-5..5e-5
    default_lr_source = "Devlin et al. 2019 (BERT): fine-tuning grid 2e-5, 3e-5, 5e-5"

    def apply(self, model: nn.Module, options, task) -> nn.Module:
        set_trainable(model, lambda name: True)
        return model

    def save_delta(self, model: nn.Module, path: Path, options, state: dict[str, Tensor] | None = None) -> None:
        model.save_pretrained(path, safe_serialization=True, state_dict=state)  # None: the model's own

    def load_delta(self, model: nn.Module, path: Path, options, task) -> nn.Module:
        return type(model).from_pretrained(path, use_safetensors=True, dtype=model.dtype)

    def merge(self, model: nn.Module) -> nn.Module:
        return model
