"""DPO / IPO: a causal-LM policy learns preferences directly, against the base as reference."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class DPO(Task):
    name = "dpo"
    summary = "preference pairs -> policy (DPO / IPO)"
    # Not the reward accuracy: it saturates early while the margins keep growing.
    main_metric = Metric("loss", maximize=False)
    head, peft_type = "causal", "CAUSAL_LM"
