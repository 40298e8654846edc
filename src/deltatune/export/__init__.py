"""`deltatune export`: a run as the files its runtime loads, checked by that runtime.

Formats (``formats.FORMATS``, one module each): ``hf`` (merged transformers model), ``delta`` (the
adapter alone), ``gguf`` and ``gguf-lora`` (llama.cpp), ``onnx`` (an encoder's graph for onnxruntime);
see docs/export.md.
"""

# in the order --help and error messages list the formats
from . import hf as _hf  # noqa: F401  (registers hf and delta)
from . import gguf as _gguf  # noqa: F401  (registers gguf and gguf-lora)
from . import onnx_format as _onnx  # noqa: F401  (registers onnx)
from .core import MANIFEST, export, replaceable
from .formats import FORMATS, Format

__all__ = ["FORMATS", "Format", "MANIFEST", "export", "replaceable"]
