"""BitFit (Ben Zaken et al., 2022): only the bias terms and the task head train.

Every affine map ``y = W x + b`` keeps ``W`` frozen and learns ``b``; the delta is the bias
vectors (and the head), usually under 0.1% of the parameters. Models without biases (Llama
family, e.g. SmolLM2) cannot use it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DeltatuneError
from ..models import head_parameter_names
from .base import Method, set_trainable
from .registry import register

if TYPE_CHECKING:
    from torch import nn


@register
class BitFit(Method):
    name = "bitfit"
    can_merge = True  # the biases are the model's own parameters
    default_lr = 1e-3  # Ben Zaken et al. 2022 (BitFit): grid 1e-4..1e-3, bias terms need the upper end
    default_lr_source = "Ben Zaken et al. 2022 (BitFit): 1e-4 to 1e-3 on GLUE; bias-only updates need the upper end"
    summary = "bias terms and the head train"

    def apply(self, model: nn.Module, options, task) -> nn.Module:
        head = set(head_parameter_names(model))
        prefix = model.base_model_prefix + "."
        backbone_biases = [n for n, _ in model.named_parameters() if n.startswith(prefix) and n.endswith("bias")]
        if not backbone_biases:
            raise DeltatuneError(f"bitfit: {type(model).__name__} has no bias terms to train (Llama-style "
                                 "models such as SmolLM2 have none); use method.name=lora instead")
        set_trainable(model, lambda name: name.endswith("bias") or name in head)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
