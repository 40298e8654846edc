"""Adaptation methods: one module each, all behind the protocol in base.py and the registry."""

from . import registry
from .base import Method
# Importing a method module registers it; the order here is the order `deltatune methods` shows.
from . import full, freeze, feature_extraction, bitfit, houlsby, lora, qlora, ia3  # noqa: E402,F401
from . import vera, loha, lokr, oft, adalora, prompt_learning  # noqa: E402,F401

__all__ = ["Method", "registry"]
