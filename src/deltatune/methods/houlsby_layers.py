"""The modules Houlsby adapters insert into a model (the method and its equation: houlsby.py)."""

from __future__ import annotations

import torch
from torch import nn

from .houlsby import ACTIVATIONS


class Adapter(nn.Module):
    """``h + W_up f(W_down h)``, with ``W_up = 0`` at initialisation."""

    def __init__(self, dim: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = getattr(nn, ACTIVATIONS[activation])()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


class WithAdapter(nn.Module):
    """A frozen output projection followed by its adapter."""

    def __init__(self, base: nn.Linear, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    @property
    def weight(self) -> torch.Tensor:  # some models read their projection's weight (T5: its dtype)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base(x))
