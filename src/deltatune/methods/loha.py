"""LoHa (Hyeon-Woo et al., 2022, FedPara; as in LyCORIS) via peft: the Hadamard product of two low-rank updates,

    W x + (alpha / r) ((B1 A1) * (B2 A2)) x

with ``B1, B2`` (d_out x r) and ``A1, A2`` (r x d_in), ``*`` element-wise. The product can reach rank r^2
from ``2 r (d_in + d_out)`` trained values, twice LoRA's count at the same r. One factor starts at zero,
so the model starts unchanged. ``merge`` folds the product into ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import doc
from ..lazy import lazy
from .peft_common import PeftMethod, adapter_problems, head_modules, task_type
from .registry import register

if TYPE_CHECKING:
    from torch import nn

peft = lazy("peft")


@dataclass
class LohaOptions:
    r: int = doc(8, "Rank of each of the two low-rank factors B1 A1 and B2 A2 (their product reaches rank r^2).")
    alpha: float = doc(8.0, "Scale numerator: the update is multiplied by alpha / r.")
    rank_dropout: float = doc(0.0, "During training, drop each rank (row of the update) with this probability.")
    module_dropout: float = doc(0.0, "During training, skip a layer's whole update with this probability.")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")

    def problems(self) -> list[str]:
        return factor_problems(self)


def factor_problems(options) -> list[str]:
    """The checks LoHa and LoKr share: rank, dropouts, target layers."""
    return adapter_problems(options, rates=("rank_dropout", "module_dropout"))


@register
class Loha(PeftMethod):
    name = "loha"
    can_merge = True
    summary = "Hadamard product of two low-rank updates (LyCORIS LoHa, peft)"
    Options = LohaOptions
    adaptable = ("Linear", "Conv1d", "Conv2d")  # peft's LoHa layers
    default_lr = 5e-4
    default_lr_source = ("no published rate for language models (FedPara trains CNNs in federated learning, LyCORIS "
                         "tunes Stable Diffusion): LoRA's 5e-4 (Hu et al. 2021), as LoHa is scaled like LoRA "
                         "(alpha / r) and starts from a zero update too")

    def search_space(self) -> dict:
        return {"r": [4, 8, 16], "alpha": [4, 8, 16, 32]}

    def peft_config(self, options: LohaOptions, task, model: nn.Module) -> peft.LoHaConfig:
        return peft.LoHaConfig(task_type=task_type(task), r=options.r, alpha=options.alpha,
                               rank_dropout=options.rank_dropout, module_dropout=options.module_dropout,
                               target_modules=options.target_modules, modules_to_save=head_modules(task, model))
