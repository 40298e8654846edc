"""AdaLoRA (Zhang et al., 2023) via peft: LoRA in SVD form, whose ranks move to the layers that need them.

    W x + (alpha / r0) P diag(e) Q x

with ``P`` (d_out x r0), ``Q`` (r0 x d_in) and the "singular values" ``e`` (r0, starting at 0, so the model
starts unchanged), r0 = ``init_r`` in every layer. While training, each rank's importance (an average over
steps of ``|w * grad w|`` over its entries of P, e and Q, times its uncertainty) is tracked, and the least
important ranks across all layers have their ``e`` set to zero until the total left is ``target_r`` per layer
on average: the budget falls from ``init_r`` to ``target_r`` along a cubic between the first ``init_fraction``
and the last ``final_fraction`` of the steps, and stays there. A penalty ``orth_reg_weight * mean ||P^T P - I|| +
||Q Q^T - I||`` keeps P and Q near orthogonal, so that dropping a rank is like dropping a singular value.

The loop drives the schedule: ``after_step`` calls peft's ``update_and_allocate`` after every optimizer step,
with the run's real total of steps, before the gradients are cleared. The penalty is added through the
gradient (``_with_penalty``), because the tasks compute their loss from the logits and peft adds it only to a
loss the model returns. The importance averages and the mask are loop state (``loop_state``): a checkpoint keeps
them, so a resumed run continues exactly. The saved delta holds only the kept ranks (peft's ``rank_pattern``
in adapter_config.json); ``merge`` folds ``P diag(e) Q`` into ``W``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import doc
from ..lazy import lazy
from .peft_common import PeftMethod, adapter_problems, head_modules, task_type
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")
peft = lazy("peft")

PENDING = "deltatune_penalty_pending"  # a buffer: lr_find puts buffers back, so its test steps leave it as it was
AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # peft's RankAllocator: importance, its average, its uncertainty


@dataclass
class AdaLoraOptions:
    init_r: int = doc(12, "Rank of every adapted layer at the start.")
    target_r: int = doc(8, "Average rank per adapted layer at the end; the ranks removed are the least important "
                           "across all layers, so some layers keep more than others. Below init_r.")
    alpha: float = doc(8.0, "Scale numerator: the update is multiplied by alpha / init_r.")
    dropout: float = doc(0.0, "Dropout on the adapter branch's input.")
    init_fraction: float = doc(0.1, "Share of the steps trained at full rank before any is removed (peft's tinit, "
                                    "as a share of the run's steps).")
    final_fraction: float = doc(0.2, "Share of the steps, at the end, trained at the final budget (peft's tfinal, as "
                                     "a share); with init_fraction below 1 in total.")
    interval: int = doc(1, "Steps between two reallocations of the budget (peft's deltaT).")
    beta1: float = doc(0.85, "Smoothing of the importance's moving average.")
    beta2: float = doc(0.85, "Smoothing of the uncertainty's moving average.")
    orth_reg_weight: float = doc(0.5, "Weight of the penalty that keeps P and Q orthogonal (0: none).")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")

    def problems(self) -> list[str]:
        out = adapter_problems(self, rank=None, rates=("dropout", "init_fraction", "final_fraction"))
        if self.init_r < 2:
            out.append(f"init_r: must be at least 2 (ranks are removed from it down to target_r), got {self.init_r}")
        if not 1 <= self.target_r < self.init_r:
            out.append(f"target_r: must be at least 1 and below init_r ({self.init_r}), got {self.target_r}")
        if self.init_fraction + self.final_fraction >= 1.0:
            out.append(f"final_fraction: with init_fraction it leaves no steps to remove ranks in "
                       f"({self.init_fraction} + {self.final_fraction} >= 1); lower one of them")
        if self.interval < 1:
            out.append(f"interval: must be at least 1 step, got {self.interval}")
        for key in ("beta1", "beta2"):
            if not 0.0 < getattr(self, key) < 1.0:
                out.append(f"{key}: must be between 0 and 1 (exclusive), got {getattr(self, key)}")
        if not (self.orth_reg_weight >= 0 and math.isfinite(self.orth_reg_weight)):
            out.append(f"orth_reg_weight: must be 0 or more, got {self.orth_reg_weight}")
        return out


@register
class AdaLora(PeftMethod):
    name = "adalora"
    can_merge = True
    summary = "LoRA in SVD form whose rank budget moves to the layers that need it (peft)"
    Options = AdaLoraOptions
    adaptable = ("Linear", "Conv1D", "Conv2d")  # peft's SVD layers
    default_lr = 1e-3
    default_lr_source = ("Zhang et al. 2023 (AdaLoRA), DeBERTaV3-base on GLUE: 5e-4 to 2.2e-3 by task; about the "
                         "geometric middle")

    def accepts(self, task) -> str | None:
        if task.loop != "examples":
            return ("AdaLoRA's rank budget is moved after each step of deltatune's training loop, and this task "
                    "samples its data in a loop of its own; use lora")
        return None

    def search_space(self) -> dict:
        return {"target_r": [2, 4, 8], "init_r": [12, 16]}

    def peft_config(self, options: AdaLoraOptions, task, model: nn.Module) -> peft.AdaLoraConfig:
        # The schedule (tinit, tfinal, total_step) needs the run's number of steps, which only the loop knows:
        # placeholders here, the real values on the first ``after_step``.
        return peft.AdaLoraConfig(task_type=task_type(task), init_r=options.init_r, target_r=options.target_r,
                                  lora_alpha=options.alpha, lora_dropout=options.dropout, deltaT=options.interval,
                                  beta1=options.beta1, beta2=options.beta2, orth_reg_weight=options.orth_reg_weight,
                                  tinit=0, tfinal=0, total_step=1, target_modules=options.target_modules,
                                  modules_to_save=head_modules(task, model))

    def apply(self, model: nn.Module, options: AdaLoraOptions, task) -> nn.Module:
        adapted = super().apply(model, options, task)
        adapted.register_buffer(PENDING, torch.tensor(True), persistent=False)
        if options.orth_reg_weight > 0:
            penalty = _penalty(adapted, options.orth_reg_weight)
            adapted.get_input_embeddings().register_forward_hook(_with_penalty(adapted, penalty))
        return adapted

    def load_delta(self, model: nn.Module, path, options, task) -> nn.Module:
        # peft's generic check reads AdaLoRA's rank_pattern (a mask per lora_E) as LoRA's (a rank per module name)
        # and warns that it matched nothing; AdaLoRA's loader does apply it (the layers are cut to the kept ranks).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
            return super().load_delta(model, path, options, task)

    def after_step(self, model: nn.Module, options: AdaLoraOptions, step: int, total: int) -> None:
        """peft's ``update_and_allocate`` for the step just taken (``step`` counts from 1), with the schedule in
        steps of this run. A step skipped for a NaN/inf gradient moves nothing: its gradients are not
        importance. Either way, the next step adds the orthogonality penalty again."""
        getattr(model, PENDING).fill_(True)
        config = model.peft_config["default"]
        config.total_step = total
        config.tinit = math.floor(options.init_fraction * total)
        config.tfinal = math.floor(options.final_fraction * total)
        if step >= total - config.tfinal and not config.rank_pattern and not model.base_model.rankallocator.exp_avg_ipt:
            return  # a run too short for its schedule measured no importance before the cut: nothing to cut by
        params = [p for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad]
        if all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params):
            model.base_model.update_and_allocate(step)

    def loop_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The rank allocator's moving averages and the current mask (``rank_pattern``)."""
        allocator = model.base_model.rankallocator
        state = {f"{kind}/{name}": value for kind in AVERAGES for name, value in getattr(allocator, kind).items()}
        pattern = model.peft_config["default"].rank_pattern or {}
        state.update({f"rank_pattern/{name}": torch.tensor(keep, dtype=torch.bool) for name, keep in pattern.items()})
        return state

    def load_loop_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        allocator = model.base_model.rankallocator
        for kind in AVERAGES:
            setattr(allocator, kind, {})
        pattern = {}
        for key, value in state.items():
            kind, name = key.split("/", 1)
            if kind == "rank_pattern":
                pattern[name] = value.tolist()
            else:
                getattr(allocator, kind)[name] = value
        model.peft_config["default"].rank_pattern = pattern or None


def _penalty(model: nn.Module, weight: float):
    """peft's orthogonality penalty (``AdaLoraModel.forward``): ``weight`` times the mean over the adapter's P
    and Q of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``."""
    factors = [(p, ".lora_A." in n) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def penalty() -> Tensor:
        total = 0
        for p, is_q in factors:
            gram = p @ p.T if is_q else p.T @ p
            total = total + torch.linalg.matrix_norm(gram - torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
        return weight * total / len(factors)

    return penalty


def _with_penalty(model: nn.Module, penalty):
    """A forward hook on the input embeddings: in the first forward with gradients after each optimizer step, the
    embeddings come out unchanged, but tied to the penalty, whose gradient then joins the step's gradient once,
    with weight 1, whatever the loss's normalisation (``_add_gradient``): the step minimises loss + penalty, as
    peft's ``loss += penalty`` does. The embeddings are outside any checkpointed layer, so activation
    checkpointing does not run the hook twice."""
    def hook(module, args, output):
        pending = getattr(model, PENDING)  # looked up each time: moving the model to a device replaces buffers
        if not (torch.is_grad_enabled() and module.training and bool(pending)):
            return None
        pending.fill_(False)
        return _add_gradient().apply(output, penalty())

    return hook


@functools.cache
def _add_gradient() -> type:
    """The autograd function: identity on ``hidden``; in backward, ``penalty`` receives gradient 1, as if it had been
    added to the loss. (Built on first use: importing this module must not import torch.)"""

    class AddGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden: Tensor, penalty: Tensor) -> Tensor:
            ctx.penalty_like = (penalty.dtype, penalty.device)
            return hidden.view_as(hidden)

        @staticmethod
        def backward(ctx, grad: Tensor):
            dtype, device = ctx.penalty_like
            return grad, torch.ones((), dtype=dtype, device=device)

    return AddGradient
