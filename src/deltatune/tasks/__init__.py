"""Tasks: one module each, all behind the protocol in base.py and the registry."""

from . import registry
from .base import Metric, Task
# Importing a task module registers it; the order here is the order listings show.
from . import classification, token_classification, causal_lm, seq2seq, reward, dpo, ppo  # noqa: E402,F401

__all__ = ["Metric", "Task", "registry"]
