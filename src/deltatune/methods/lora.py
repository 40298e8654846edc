"""LoRA (Hu et al., 2021) via peft: ``W x + (alpha / r) * B A x`` with rank-r ``A``, ``B``; ``B = 0`` at init.

Saved in peft's own format, so ``peft.PeftModel.from_pretrained(base, run_dir / "delta")``
loads our adapters; ``merge`` folds ``(alpha / r) * B A`` into ``W`` (no added latency).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import doc
from ..lazy import lazy
from .peft_common import PeftMethod, head_modules, task_type
from .registry import register

if TYPE_CHECKING:
    from torch import nn

peft = lazy("peft")


@dataclass
class LoraOptions:
    r: int = doc(8, "Rank of the update B A.")
    alpha: float = doc(16.0, "Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = doc(0.05, "Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"r: must be at least 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules == []:
            out.append("target_modules: empty; name the layers to adapt (e.g. [query, value]) or leave it unset "
                       "for peft's choice for the architecture")
        return out


@register
class Lora(PeftMethod):
    name = "lora"
    can_merge = True
    summary = "low-rank updates B A on chosen linear layers (peft)"
    Options = LoraOptions
    default_lr = 5e-4  # Hu et al. 2021, RoBERTa-base GLUE: 4e-4..5e-4 (an order of magnitude above full fine-tuning)
    default_lr_source = ("Hu et al. 2021 (LoRA), RoBERTa-base on GLUE: 4e-4 to 5e-4, an order of magnitude above "
                         "full fine-tuning's 2e-5, as later LoRA recipes also find")

    def search_space(self) -> dict:
        return {"r": [4, 8, 16, 32], "alpha": [8, 16, 32, 64], "dropout": [0.0, 0.05, 0.1]}

    def peft_config(self, options: LoraOptions, task, model: nn.Module) -> peft.LoraConfig:
        return peft.LoraConfig(task_type=task_type(task), r=options.r, lora_alpha=options.alpha,
                               lora_dropout=options.dropout, target_modules=options.target_modules,
                               modules_to_save=head_modules(task, model))
