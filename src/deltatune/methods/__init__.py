"""Adaptation methods: one module each, all behind the protocol in base.py and the registry."""

import logging

# peft imports bitsandbytes when it is installed; on AVX512-BF16 CPUs bitsandbytes then warns that
# the optional `kernels` package (which downloads kernels from a hub) is missing. It cannot work
# offline and deltatune does not need it: see README, QLoRA.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from . import registry  # noqa: E402
from .base import Method
# Importing a method module registers it; the order here is the order `deltatune methods` shows.
from . import full, freeze, feature_extraction, bitfit, houlsby, lora, qlora, ia3, prompt_learning  # noqa: E402,F401

__all__ = ["Method", "registry"]
