"""Evaluate a model on prepared examples by task name: the task's loss and metrics (``tasks/``).

The loop and the run code hold a task instance and call it directly; these functions serve callers
that have a model, examples and a task's name (scripts, benchmarks, tests).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..tasks import common, registry
from ..tasks.base import Task
from ..tasks.common import decoder_parts

__all__ = ["decoder_parts", "evaluate", "forward", "forward_loss", "task_for"]


def task_for(task: str | Task, batch_size: int = 64, pad_id: int = 0, labels: list[str] | None = None,
             chunked_loss: bool = True) -> Task:
    """A task instance with these settings (an instance is returned as it is)."""
    if isinstance(task, Task):
        return task
    train = dataclasses.replace(TrainConfig(), eval_batch_size=batch_size, chunked_loss=chunked_loss)
    return registry.get(task)(Config(task=task, train=train), pad_id=pad_id, labels=labels)


def evaluate(model: nn.Module, examples: list, task: str | Task, batch_size: int, pad_id: int,
             labels: list[str] | None = None, chunked_loss: bool = True) -> dict:
    """The task's loss and metrics on ``examples`` (``chunked_loss`` only saves memory here)."""
    return task_for(task, batch_size, pad_id, labels, chunked_loss).evaluate(model, examples)


def forward_loss(model: nn.Module, inputs: dict, targets, task: str | Task, chunked: bool = False,
                 labels: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """The task's (loss sum, count) for one batch."""
    return task_for(task, labels=labels, chunked_loss=chunked).loss(model, {"inputs": inputs, "targets": targets})


def forward(model: nn.Module, inputs: dict, targets: torch.Tensor, task: str | Task) -> torch.Tensor:
    """Logits for a batch of the task (an encoder-decoder reads its targets shifted right)."""
    head = task.head if isinstance(task, Task) else registry.get(task).head
    return common.forward(model, inputs, targets, encoder_decoder=head == "seq2seq")
