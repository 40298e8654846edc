"""`deltatune export`: a run as the files its runtime loads, checked by that runtime.

Formats (``formats.FORMATS``, one module each): ``hf`` (merged transformers model), ``delta`` (the
adapter alone), ``onnx`` (an encoder's graph for onnxruntime); see docs/export.md.
"""

from . import hf as _hf  # noqa: F401  (registers hf and delta)
from . import onnx_format as _onnx  # noqa: F401  (registers onnx)
from .core import MANIFEST, export, replaceable
from .formats import FORMATS, Format

__all__ = ["FORMATS", "Format", "MANIFEST", "export", "replaceable"]
