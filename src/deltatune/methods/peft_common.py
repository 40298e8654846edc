"""What every peft-backed method shares: wrap with a peft config, save and load in peft's format.

A subclass only says how its options become a peft config. The saved ``delta/`` folder is a
normal peft adapter folder, so ``peft.PeftModel.from_pretrained(base, delta_dir)`` loads it.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from ..errors import CannotMerge
from ..models import head_module_names
from .base import Method


def task_type(task: str) -> TaskType:
    return {"classification": TaskType.SEQ_CLS, "reward": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM,
            "dpo": TaskType.CAUSAL_LM, "ppo": TaskType.CAUSAL_LM,
            "token_classification": TaskType.TOKEN_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM}[task]


def head_modules(task: str, model: nn.Module) -> list[str] | None:
    """The freshly initialised classification (or reward) head trains alongside the adapter."""
    return head_module_names(model) if task in ("classification", "token_classification", "reward") else None


class PeftMethod(Method):
    tasks = (*Method.tasks, "ppo")

    def peft_config(self, options, task: str, model: nn.Module) -> PeftConfig:
        raise NotImplementedError

    def apply(self, model: nn.Module, options, task: str) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls deprecated transformers helpers
            return get_peft_model(model, self.peft_config(options, task, model))

    def save_delta(self, model: nn.Module, path: Path, options) -> None:
        model.save_pretrained(path, safe_serialization=True)

    def load_delta(self, model: nn.Module, path: Path, options, task: str) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return PeftModel.from_pretrained(model, path, is_trainable=False)

    def merge(self, model: nn.Module) -> nn.Module:
        if not self.can_merge:
            raise CannotMerge(f"{self.name}: {self.why_no_merge}")
        return model.merge_and_unload()

    why_no_merge = ""
