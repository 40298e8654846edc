"""Sequence classification: one text, one class label (several tasks at once: data.tasks)."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class Classification(Task):
    name = "classification"
    summary = "text -> one of several labels"
    main_metric = Metric("accuracy", maximize=True)
    head, peft_type, new_head, one_label_per_text = "sequence", "SEQ_CLS", True, True
