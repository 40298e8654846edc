"""`deltatune export`: a run as the files its runtime loads, checked by that runtime.

Formats (``formats.FORMATS``, one module each): ``hf`` (merged transformers model), ``delta`` (the
adapter alone), ``gguf`` and ``gguf-lora`` (llama.cpp); see docs/export.md.
"""

from . import hf as _hf  # noqa: F401  (registers hf and delta)
from . import gguf as _gguf  # noqa: F401  (registers gguf and gguf-lora)
from .core import MANIFEST, export, replaceable
from .formats import FORMATS, Format

__all__ = ["FORMATS", "Format", "MANIFEST", "export", "replaceable"]
