"""Sequence to sequence on an encoder-decoder: source text -> target text."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class Seq2Seq(Task):
    name = "seq2seq"
    summary = "source -> target text on an encoder-decoder"
    main_metric = Metric("perplexity", maximize=False)
    head, peft_type = "seq2seq", "SEQ_2_SEQ_LM"
