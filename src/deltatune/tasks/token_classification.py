"""Token classification: one tag per word (e.g. part of speech)."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class TokenClassification(Task):
    name = "token_classification"
    summary = "words -> one tag each"
    main_metric = Metric("accuracy", maximize=True)
    head, peft_type, new_head = "token", "TOKEN_CLS", True
