"""One dropout mask for the LoRA branches that read the same tensor.

peft gives every LoRA branch its own dropout, so a layer with LoRA on q, k and v draws three masks over the
same hidden states, multiplies three times and keeps three dropped copies for backward. ``SharedDropout``
draws one: the first branch to see a tensor drops it out, the next branches given that same tensor (same
object, unchanged) get the same dropped tensor. Each branch still sees its input with each element kept with
probability 1 - p and scaled by 1 / (1 - p), as before; what changes is that the branches' masks are no
longer independent of each other. The mask is kept for backward as booleans (``functions.Dropout``).

``lora_dropout`` keeps peft's maths and its random draws: each branch its own mask, drawn as ``F.dropout``
draws it on the CPU, so a run's losses are those of the plain modules. What changes is what backward keeps:
peft's branch keeps its float mask and its dropped copy of the input (8 bytes per element); the fused branch
(``functions.DroppedLinear``, the dropout and ``lora_A`` in one) keeps a boolean mask and the input itself,
one tensor for every branch that reads it (q, k and v read the same hidden states), and recomputes the
dropped copy in backward.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .functions import DroppedLinear, Dropout


class _LastDrop:
    """The last tensor dropped out and its result, held weakly: nothing is kept alive past its use."""

    def __init__(self):
        self.key: tuple | None = None
        self.result = lambda: None

    def get(self, x: Tensor, p: float) -> Tensor | None:
        if self.key is None:
            return None
        source, version, rate = self.key
        return self.result() if source() is x and version == x._version and rate == p else None

    def put(self, x: Tensor, p: float, result: Tensor) -> None:
        self.key, self.result = (weakref.ref(x), x._version, p), weakref.ref(result)


class SharedDropout(nn.Dropout):
    def __init__(self, p: float, last: _LastDrop):
        super().__init__(p)
        self._last = last

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        dropped = self._last.get(x, self.p)
        if dropped is None:
            dropped = Dropout.apply(x, self.p) if torch.is_grad_enabled() and x.requires_grad else \
                torch.nn.functional.dropout(x, self.p, True)
            self._last.put(x, self.p, dropped)
        return dropped


def share_lora_dropout(model: nn.Module) -> int:
    """Replace every LoRA branch's ``nn.Dropout`` (peft's ``lora_dropout``) by a ``SharedDropout`` that shares
    its mask with the branches reading the same tensor. Returns how many were replaced."""
    shared = [m for m in model.modules() if isinstance(m, SharedDropout)]
    last, count = (shared[0]._last if shared else _LastDrop()), 0  # again (a rebuilt layer): the same memory
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is nn.Dropout and drop.p > 0:
                shared = SharedDropout(drop.p, last)
                shared.train(drop.training)
                drops[name] = shared
                count += 1
    return count


class _DroppedLoraA:
    """A LoRA branch's ``lora_A`` with the branch's dropout inside (its ``lora_dropout`` is then an Identity)."""

    def forward(self, x: Tensor) -> Tensor:
        p = self._fused_dropout  # 0 < p < 1 (fuse_lora_dropout)
        if not self.training:
            return super().forward(x)
        noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)  # F.dropout's draws and values on the CPU
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return DroppedLinear.apply(x, self.weight, noise, p)
        return torch.nn.functional.linear(x * noise, self.weight, self.bias)


def fuse_lora_dropout(model: nn.Module, switch) -> int:
    """Give every plain LoRA branch with dropout (peft's ``lora_dropout`` an ``nn.Dropout``, ``lora_A`` an
    ``nn.Linear`` without bias, no variant such as DoRA, which reads the dropped input itself) the fused
    ``lora_A``; ``switch(module, cls)`` swaps a module's class. Returns how many branches were switched."""
    count = 0
    for module in model.modules():
        drops, downs = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if not isinstance(drops, nn.ModuleDict) or not isinstance(downs, nn.ModuleDict):
            continue
        variants = set(getattr(module, "lora_variant", {}) or {}) | \
            {k for k, v in (getattr(module, "use_dora", {}) or {}).items() if v}
        for name, drop in drops.items():
            down = downs[name] if name in downs else None
            if (type(drop) is not nn.Dropout or not 0 < drop.p < 1 or name in variants or not isinstance(down, nn.Linear)
                    or down.bias is not None):
                continue
            down._fused_dropout = drop.p
            switch(down, _DroppedLoraA)
            drops[name] = nn.Identity()
            count += 1
    return count
