"""Reward models: a scalar head scores a prompt and a response; trained on comparisons or rankings."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class Reward(Task):
    name = "reward"
    summary = "prompt + response -> a scalar score, from preferences"
    main_metric = Metric("accuracy", maximize=True)
    head, peft_type, new_head = "sequence", "SEQ_CLS", True
