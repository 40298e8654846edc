"""OFT, orthogonal fine-tuning (Qiu et al., 2023; in peft 0.21 the input-side form of Qiu et al., 2025), via peft:

    W (R x)    with R = blockdiag(R_1, ..., R_k), R_i = (I + Q_i)(I - Q_i)^-1 (Cayley), Q_i skew-symmetric

Each adapted layer rotates its input in blocks of ``block_size`` features (``k = d_in / block_size`` blocks)
before the frozen ``W``; a rotation keeps the angles between ``W``'s neurons, which the papers argue keeps
what the base model knows. Only the upper triangle of each ``Q_i`` trains: ``k b (b - 1) / 2`` values per layer
(``b (b - 1) / 2`` with ``block_share``). ``Q = 0`` at init, so ``R = I`` and the model starts unchanged. By
default the inverse is replaced by its Neumann series (peft's ``use_cayley_neumann``, 5 terms): cheaper,
nearly but not exactly orthogonal. ``merge`` folds ``R`` into ``W`` (``W R``).
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
class OftOptions:
    block_size: int = doc(32, "Features per rotation block; each adapted layer trains d_in / block_size blocks of "
                              "block_size (block_size - 1) / 2 values. Where it does not divide a layer's input "
                              "width, peft takes the nearest size that does (and warns).")
    block_share: bool = doc(False, "One rotation block shared by all blocks of a layer (block_size (block_size - 1) "
                                   "/ 2 values per layer).")
    cayley_neumann: bool = doc(True, "Approximate the Cayley transform's inverse by a 5-term Neumann series "
                                     "(peft's default: faster, nearly orthogonal); false: the exact inverse.")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")

    def problems(self) -> list[str]:
        out = []
        if self.block_size < 2:
            out.append(f"block_size: must be at least 2 (a 1 x 1 rotation has nothing to train), got {self.block_size}")
        return out + adapter_problems(self, rank=None, rates=())


@register
class Oft(PeftMethod):
    name = "oft"
    can_merge = True
    summary = "block-diagonal orthogonal rotation of each adapted layer's input (peft)"
    Options = OftOptions
    adaptable = ("Linear", "Conv2d", "Embedding")  # peft's OFT layers
    default_lr = 5e-4
    default_lr_source = ("no rate for language models taken from the papers yet (Qiu et al. 2023 tune Stable "
                         "Diffusion): LoRA's 5e-4 (Hu et al. 2021), as OFT also starts from an unchanged model and "
                         "trains a comparable number of values per layer")

    def search_space(self) -> dict:
        return {"block_size": [8, 16, 32, 64]}

    def peft_config(self, options: OftOptions, task, model: nn.Module) -> peft.OFTConfig:
        # peft 0.21's module_dropout and coft are left out: the first is built but never applied in the
        # linear layer's forward, the second rewrites the trained weights inside every forward.
        return peft.OFTConfig(task_type=task_type(task), r=0, oft_block_size=options.block_size,
                              block_share=options.block_share, use_cayley_neumann=options.cayley_neumann,
                              target_modules=options.target_modules, modules_to_save=head_modules(task, model))
