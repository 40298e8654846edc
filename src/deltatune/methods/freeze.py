"""Layer freezing: only the top N transformer layers, and everything above them, train.

"Above" is whatever the model registers after its layer stack: the final norm or pooler and
the task head. Embeddings and the lower layers stay frozen. ``trainable_layers=0`` trains the
head alone (with the backbone's last norm/pooler).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import doc
from ..errors import DeltatuneError
from ..models import transformer_layers
from .base import Method, set_trainable
from .registry import register

if TYPE_CHECKING:
    from torch import nn


@dataclass
class FreezeOptions:
    trainable_layers: int = doc(2, "How many of the top transformer layers train (the head always trains).")

    def problems(self) -> list[str]:
        return [] if self.trainable_layers >= 0 else [f"trainable_layers: must be 0 or more, got {self.trainable_layers}"]


@register
class Freeze(Method):
    name = "freeze"
    can_merge = True  # the trained layers are ordinary weights
    summary = "top N layers and the head train"
    Options = FreezeOptions
    default_lr = 5e-5  # the top of BERT's fine-tuning grid (Devlin et al. 2019): fewer weights move
    default_lr_source = ("full fine-tuning's range (Devlin et al. 2019: 2e-5 to 5e-5), at its top since only the "
                         "upper layers and the new head move")

    def search_space(self) -> dict:
        return {"trainable_layers": {"low": 1, "high": 4}}

    def apply(self, model: nn.Module, options: FreezeOptions, task) -> nn.Module:
        layers = transformer_layers(model)
        n = options.trainable_layers
        if n > len(layers):
            raise DeltatuneError(f"method.trainable_layers={n}, but the model has {len(layers)} layers; "
                                 f"use a number from 0 to {len(layers)}")
        params = list(model.named_parameters())
        position = {id(p): i for i, (_, p) in enumerate(params)}
        # Parameters are registered bottom-up: from the first trained layer on, everything trains.
        if n:
            start = position[id(next(layers[len(layers) - n].parameters()))]
        else:
            start = max(position[id(p)] for p in layers.parameters()) + 1
        trained = {name for name, _ in params[start:]}
        set_trainable(model, lambda name: name in trained)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        return model
