"""What every peft-backed method shares: wrap with a peft config, save and load in peft's format.

A subclass only says how its options become a peft config. The saved ``delta/`` folder is a
normal peft adapter folder, so ``peft.PeftModel.from_pretrained(base, delta_dir)`` loads it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..assets import portable_name
from ..errors import CannotMerge, ConfigError
from ..lazy import lazy
from ..models import head_module_names
from .base import Method

nn = lazy("torch.nn")
peft = lazy("peft")


def task_type(task) -> peft.TaskType:
    """peft's task type for the task's head (``task.peft_type`` names a ``TaskType`` member)."""
    return peft.TaskType[task.peft_type]


def head_modules(task, model: nn.Module) -> list[str] | None:
    """A freshly initialised head (classification, reward) trains and is saved alongside the adapter."""
    return head_module_names(model) if task.new_head else None


def _layer_types(*names: str) -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers

    return tuple(Conv1D if n == "Conv1D" else getattr(nn, n) for n in names)


def _layers(model: nn.Module, skip: list[str] | None) -> dict[str, nn.Module]:
    """Named modules, without those inside ``skip`` (the new head, which trains in full anyway)."""
    return {name: m for name, m in model.named_modules() if name and name.split(".")[0] not in (skip or ())}


def linear_layer_names(model: nn.Module, skip: list[str] | None = None) -> list[str]:
    """The distinct last names of the model's linear layers (query, key, value, dense; q_proj, ...)."""
    linear = _layer_types("Linear", "Conv1D")
    return sorted({name.rsplit(".", 1)[-1] for name, m in _layers(model, skip).items() if isinstance(m, linear)})


def module_problems(model: nn.Module, options, adaptable: tuple[type, ...], skip: list[str] | None) -> list[str]:
    """The ``*_modules`` options (target_modules, feedforward_modules) against the model's layers: every
    name must match at least one layer the method can adapt, as peft matches them (the full module
    name or a dotted suffix of it: ``query``, ``attention.self.query``). peft itself fails only when
    nothing at all matches, with a traceback, and ignores a misspelt name next to a right one."""
    layers = _layers(model, skip)
    problems = []
    for key in ("target_modules", "feedforward_modules"):
        names = getattr(options, key, None)
        if not names or isinstance(names, str):
            continue
        unmatched = []
        for target in names:
            found = [m for n, m in layers.items() if n == target or n.endswith("." + target)]
            if not found and target.split(".")[0] in (skip or ()):
                problems.append(f"method.{key}: {target!r} is the task's new head, which trains in full anyway; "
                                "drop it from the list")
            elif not found:
                unmatched.append(target)
            elif not any(isinstance(m, adaptable) for m in found):
                problems.append(f"method.{key}: {target!r} is a {type(found[0]).__name__}, not a layer this method "
                                f"can adapt; name linear layers instead: {', '.join(linear_layer_names(model, skip))}")
        if unmatched:
            problems.append(f"method.{key}: {', '.join(map(repr, unmatched))} matched no layer of "
                            f"{type(model).__name__}; available linear layers: "
                            f"{', '.join(linear_layer_names(model, skip))}")
    return problems


def adapter_problems(options, rank: str | None = "r", rates: tuple[str, ...] = ("dropout",)) -> list[str]:
    """The option checks most peft methods share: a rank of at least 1, dropout-like rates in [0, 1), and
    target layers that are unset (peft's choice) or named."""
    out = []
    if rank is not None and getattr(options, rank) < 1:
        out.append(f"{rank}: must be at least 1, got {getattr(options, rank)}")
    for key in rates:
        if not 0.0 <= getattr(options, key) < 1.0:
            out.append(f"{key}: must be in [0, 1), got {getattr(options, key)}")
    if options.target_modules == []:
        out.append("target_modules: empty; name the layers to adapt (e.g. [query, value]) or leave it unset "
                   "for peft's choice for the architecture")
    return out


class PeftMethod(Method):
    """peft's adapters can be switched off at run time (``disable_adapter``): the base comes back."""
    switchable_off = True
    adaptable = ("Linear", "Conv1D", "Embedding", "Conv1d", "Conv2d", "Conv3d")  # layer types peft can wrap

    def peft_config(self, options, task, model: nn.Module) -> peft.PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module, options, task) -> nn.Module:
        """Checks the layer names first: a ConfigError naming the option, before any run directory."""
        head = head_modules(task, model)
        problems = module_problems(model, options, _layer_types(*self.adaptable), head)
        if problems:
            raise ConfigError(problems)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls deprecated transformers helpers
            try:
                adapted = peft.get_peft_model(model, self.peft_config(options, task, model))
            except ValueError as exc:  # e.g. peft has no default target_modules for this architecture
                if "target_modules" not in str(exc):
                    raise
                raise ConfigError([f"method.target_modules: peft cannot adapt {type(model).__name__} with these "
                                   f"settings ({exc}); set method.target_modules to some of its linear layers: "
                                   f"{', '.join(linear_layer_names(model, head))}"]) from exc
        if getattr(task, "cfg", None) is not None:  # a bound task (plan sizes a model with the task class)
            for config in adapted.peft_config.values():  # adapter_config.json: a name, not this machine's path
                config.base_model_name_or_path = portable_name(task.cfg.model)
        return adapted

    def save_delta(self, model: nn.Module, path: Path, options, state: dict | None = None) -> None:
        # The vocabulary is never resized, so no embedding matrix is saved ("auto" would look the base up on the
        # Hub by its name in adapter_config.json). peft picks the adapter's tensors from ``state`` when given.
        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False, state_dict=state)

    def load_delta(self, model: nn.Module, path: Path, options, task) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return peft.PeftModel.from_pretrained(model, path, is_trainable=False)

    @contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[nn.Module]:
        with model.disable_adapter():
            yield model

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.can_merge:
            raise CannotMerge(f"{self.name}: {self.why_no_merge}")
        return model.merge_and_unload()

    why_no_merge = ""
