"""What every peft-backed method shares: wrap with a peft config, save and load in peft's format.

A subclass only says how its options become a peft config. The saved ``delta/`` folder is a
normal peft adapter folder, so ``peft.PeftModel.from_pretrained(base, delta_dir)`` loads it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from ..errors import CannotMerge
from ..models import head_module_names
from .base import Method


def task_type(task) -> TaskType:
    """peft's task type for the task's head (``task.peft_type`` names a ``TaskType`` member)."""
    return TaskType[task.peft_type]


def head_modules(task, model: nn.Module) -> list[str] | None:
    """A freshly initialised head (classification, reward) trains and is saved alongside the adapter."""
    return head_module_names(model) if task.new_head else None


class PeftMethod(Method):
    """peft's adapters can be switched off at run time (``disable_adapter``): the base comes back."""
    switchable_off = True

    def peft_config(self, options, task, model: nn.Module) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module, options, task) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls deprecated transformers helpers
            return get_peft_model(model, self.peft_config(options, task, model))

    def save_delta(self, model: nn.Module, path: Path, options) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def load_delta(self, model: nn.Module, path: Path, options, task) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return PeftModel.from_pretrained(model, path, is_trainable=False)

    @contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[nn.Module]:
        with model.disable_adapter():
            yield model

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.can_merge:
            raise CannotMerge(f"{self.name}: {self.why_no_merge}")
        return model.merge_and_unload()

    why_no_merge = ""
