"""Causal-LM supervised fine-tuning: prompt/response pairs (loss on the response) or plain text."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class CausalLM(Task):
    name = "causal_lm"
    summary = "prompt -> response (or plain text), next-token loss"
    main_metric = Metric("perplexity", maximize=False)
    head, peft_type = "causal", "CAUSAL_LM"
