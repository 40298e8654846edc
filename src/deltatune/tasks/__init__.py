"""Tasks: one module each, all behind the protocol in base.py and the registry."""

from . import registry
from .base import Metric, Task
# Importing a task module registers it; the order here is the order listings show.
from . import classification, token_classification, causal_lm, seq2seq, reward, dpo, reference_free, kto, ppo, grpo  # noqa: E402,F401

__all__ = ["Metric", "Task", "registry", "create", "prepare", "prepare_rows"]


def create(cfg, pad_id: int = 0, labels: list[str] | None = None) -> Task:
    """The configured task, bound to ``cfg`` (``cfg.task`` names it)."""
    return registry.get(cfg.task)(cfg, pad_id=pad_id, labels=labels)


def prepare(cfg, tokenizer):
    """The configured data as the configured task's examples (``Task.prepare``)."""
    return create(cfg, pad_id=tokenizer.pad_token_id).prepare(tokenizer)


def prepare_rows(cfg, tokenizer=None):
    """The data pipeline's rows for the configured task (``Task.rows``)."""
    return create(cfg).rows(tokenizer)
