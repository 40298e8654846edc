"""VeRA (Kopiczko et al., 2024) via peft: ``W x + diag(b) B diag(d) A x``.

One pair of frozen random matrices, ``A`` (r x d_in) and ``B`` (d_out x r), is drawn once from a seed and
shared by every adapted layer (each slices it to its own size); per layer only two vectors train: ``d``
(r values, each starting at ``d_initial``) and ``b`` (d_out values, starting at 0, so the model starts
unchanged). A layer costs ``r + d_out`` trained values against LoRA's ``r (d_in + d_out)``.

The delta folder holds A and B beside the vectors (peft's ``save_projection``), so a reload uses the very
matrices the vectors were trained with, whatever the random generator of the loading machine.
``merge`` folds ``diag(b) B diag(d) A`` into ``W``.
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
class VeraOptions:
    r: int = doc(256, "Rank of the shared random matrices A (r x d_in) and B (d_out x r). Each adapted layer trains "
                      "r + d_out values, so a large r costs little; the paper uses 256 to 1024.")
    d_initial: float = doc(0.1, "Starting value of every entry of the trained vector d (b starts at 0, so the "
                                "model starts unchanged).")
    dropout: float = doc(0.0, "Dropout on the VeRA branch's input.")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")
    projection_seed: int = doc(0, "Seed of the shared random matrices A and B (peft's projection_prng_key); "
                                  "they are saved with the delta, so loading does not draw them again.")

    def problems(self) -> list[str]:
        return adapter_problems(self)


@register
class Vera(PeftMethod):
    name = "vera"
    can_merge = True
    summary = "shared frozen random low-rank matrices, per-layer trained scaling vectors (peft)"
    Options = VeraOptions
    adaptable = ("Linear", "Conv1D")  # peft's VeRA wraps these only
    default_lr = 4e-3  # Kopiczko et al. 2024 (VeRA): ten times LoRA's rate
    default_lr_source = ("Kopiczko et al. 2024 (VeRA): 4e-3 to 1e-2 for the vectors on RoBERTa GLUE tasks, and 4e-3 "
                         "against LoRA's 4e-4 for Llama instruction tuning: VeRA's vectors train about ten times "
                         "faster than LoRA's matrices")

    def search_space(self) -> dict:
        return {"r": [64, 256, 1024], "d_initial": [0.01, 0.1, 1.0]}

    def peft_config(self, options: VeraOptions, task, model: nn.Module) -> peft.VeraConfig:
        return peft.VeraConfig(task_type=task_type(task), r=options.r, d_initial=options.d_initial,
                               vera_dropout=options.dropout, target_modules=options.target_modules,
                               projection_prng_key=options.projection_seed, save_projection=True,
                               modules_to_save=head_modules(task, model))
