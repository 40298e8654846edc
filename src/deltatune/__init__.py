"""deltatune: fine-tune language models locally; a tuned model is the base plus a small delta."""

__version__ = "0.1.0"

import logging as _logging

# peft imports bitsandbytes when it is installed (from whichever deltatune module first imports
# transformers/peft); on AVX512-BF16 CPUs bitsandbytes then warns that the optional `kernels`
# package, which downloads kernels from a hub, is missing. It cannot work offline and deltatune
# does not need it: see README, QLoRA.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
