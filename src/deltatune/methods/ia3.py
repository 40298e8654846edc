"""(IA)3 (Liu et al., 2022) via peft: learned vectors rescale activations, ``y = l * (W x)``.

Keys, values and the feed-forward activations are multiplied element-wise by trained vectors
``l`` (initialised to ones, so the model starts unchanged). The scaling folds into ``W``:
``merge`` gives a plain model.
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
class IA3Options:
    target_modules: list[str] | None = doc(None, "Layers whose outputs (or, for feed-forward ones, inputs) are "
                                                 "rescaled; default: peft's choice for the architecture.")
    feedforward_modules: list[str] | None = doc(None, "Which of target_modules are feed-forward layers (scaled "
                                                      "at their input); default: peft's choice.")

    def problems(self) -> list[str]:
        out = [f"{key}: empty; name layers (e.g. [key, value]) or leave it unset for peft's choice"
               for key in ("target_modules", "feedforward_modules") if getattr(self, key) == []]
        if self.target_modules and self.feedforward_modules:
            extra = [m for m in self.feedforward_modules if m not in self.target_modules]
            if extra:
                out.append(f"feedforward_modules: {', '.join(map(repr, extra))} not in method.target_modules; every "
                           "feed-forward layer to rescale must also be a target")
        return out


@register
class IA3(PeftMethod):
    name = "ia3"
    can_merge = True
    summary = "learned vectors rescale keys, values and feed-forward activations (peft)"
    Options = IA3Options
    default_lr = 3e-3  # Liu et al. 2022 (T-Few): IA3 trained at 3e-3
    default_lr_source = "Liu et al. 2022 (T-Few): IA3 vectors trained at 3e-3"

    def peft_config(self, options: IA3Options, task, model: nn.Module) -> peft.IA3Config:
        return peft.IA3Config(task_type=task_type(task), target_modules=options.target_modules,
                              feedforward_modules=options.feedforward_modules,
                              modules_to_save=head_modules(task, model))
