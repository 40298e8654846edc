"""LoKr (KronA, Edalati et al., 2022; as in LyCORIS) via peft: a Kronecker-product update,

    W x + (alpha / r) (W1 kron W2) x

Each side of ``W`` is split into two factors, ``d_out = p q`` and ``d_in = s t`` (the pair nearest the square
root, smaller first, unless ``decompose_factor`` says otherwise): ``W1`` is p x s, ``W2`` is q x t. ``W2`` is
itself low-rank, ``B2 A2`` of rank r, when r < max(q, t) / 2, and full otherwise; ``W1`` is full (or
low-rank too with ``decompose_both``). The update reaches rank ``rank(W1) rank(W2)`` from roughly
sqrt(d_out d_in) values. ``W2`` (or ``B2``) starts at zero, so the model starts unchanged; ``merge`` folds the
product into ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import doc
from ..lazy import lazy
from .loha import factor_problems
from .peft_common import PeftMethod, head_modules, task_type
from .registry import register

if TYPE_CHECKING:
    from torch import nn

peft = lazy("peft")


@dataclass
class LokrOptions:
    r: int = doc(8, "Rank of the larger Kronecker factor W2 = B2 A2; used only where r < max(q, t) / 2 of its "
                    "q x t shape, else W2 is a full matrix.")
    alpha: float = doc(8.0, "Scale numerator: the update is multiplied by alpha / r.")
    rank_dropout: float = doc(0.0, "During training, drop each rank (row of the update) with this probability.")
    module_dropout: float = doc(0.0, "During training, skip a layer's whole update with this probability.")
    decompose_both: bool = doc(False, "Make the smaller factor W1 low-rank as well (where r is below half its size).")
    decompose_factor: int = doc(-1, "Wanted size of the first factor of each side (the divisor nearest to it is "
                                    "taken); -1: the factor pair nearest the square root.")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")

    def problems(self) -> list[str]:
        out = factor_problems(self)
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            out.append(f"decompose_factor: use -1 (near the square root) or a positive size, "
                       f"got {self.decompose_factor}")
        return out


@register
class Lokr(PeftMethod):
    name = "lokr"
    can_merge = True
    summary = "Kronecker product of a small and a low-rank factor (LyCORIS LoKr, peft)"
    Options = LokrOptions
    adaptable = ("Linear", "Conv1d", "Conv2d")  # peft's LoKr layers
    default_lr = 5e-4
    default_lr_source = ("no rate for language models taken from the papers yet (KronA, Edalati et al. 2022; LyCORIS "
                         "tunes Stable Diffusion): LoRA's 5e-4 (Hu et al. 2021), as LoKr is scaled like LoRA "
                         "(alpha / r) and starts from a zero update too")

    def search_space(self) -> dict:
        return {"r": [4, 8, 16], "alpha": [4, 8, 16, 32]}

    def peft_config(self, options: LokrOptions, task, model: nn.Module) -> peft.LoKrConfig:
        return peft.LoKrConfig(task_type=task_type(task), r=options.r, alpha=options.alpha,
                               rank_dropout=options.rank_dropout, module_dropout=options.module_dropout,
                               decompose_both=options.decompose_both, decompose_factor=options.decompose_factor,
                               target_modules=options.target_modules, modules_to_save=head_modules(task, model))
