"""llama.cpp (through llama-cpp-python) as the runtime of GGUF exports: open a model (with a LoRA
adapter), greedy generation, the logits of a token sequence, llama.cpp's own quantizer, and a small
module with the ``generate`` that ``tasks.causal_lm`` calls, so that ``deltatune predict`` runs a GGUF
export through the run's own templates and decoding."""

from __future__ import annotations

import atexit
import ctypes
import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from torch import nn

from ..errors import ExportError

FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError("GGUF exports are checked and run by llama-cpp-python, which is not installed: "
                          "pip install 'deltatune[export]' (it builds llama.cpp from source, a few minutes)") from exc
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's loading chatter, not its errors
    return llama_cpp


def threads() -> int:
    """As many threads as torch uses, so that speed comparisons are fair."""
    return max(1, torch.get_num_threads())


def open_model(path: Path, lora: Path | None = None, n_ctx: int | None = None, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on ``path`` (plus the LoRA adapter ``lora``) with room for ``n_ctx`` tokens
    (default: the model's context, at most 2048), closed at exit (llama-cpp-python otherwise frees it while
    the interpreter is being torn down, and prints a traceback).

    The attention cache is kept in f32: llama.cpp's default f16 cache alone moves an f32 model's logits by
    ~1e-2 (measured on the test Llama: 0.014, against 1.5e-5 with an f32 cache), enough to flip a near-tied
    greedy choice; with it, what the check measures is the file, and predict gives the run's answers."""
    llama_cpp = _llama_cpp()
    if n_ctx is None:
        n_ctx = min(2048, int(GGUFReader(path).fields["llama.context_length"].contents()))
    try:
        llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                              logits_all=logits_all, n_threads=threads(), n_threads_batch=threads(),
                              type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ExportError(f"{lora or path}: llama.cpp cannot load it ({exc}); export the run again") from exc
    atexit.register(llm.close)
    return llm


def greedy(llm, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """The tokens llama.cpp generates after ``ids``, greedily, up to and including ``eos_id`` (as
    transformers' ``generate`` returns them). The state is reset first: no prompt shares another's cache."""
    if len(ids) + max_new_tokens > llm.n_ctx():
        raise ExportError(f"a prompt of {len(ids)} tokens and {max_new_tokens} new ones do not fit llama.cpp's "
                          f"context of {llm.n_ctx()} tokens; use a shorter prompt or fewer new tokens")
    llm.reset()
    out: list[int] = []
    if max_new_tokens < 1:
        return out
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=False):
        out.append(int(token))
        if token == eos_id or len(out) == max_new_tokens:
            break
    return out


def logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits at every position of ``ids`` (the model opened with ``logits_all``)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def quantize(source: Path, target: Path, kind: str) -> None:
    """``source`` (an f32 or f16 GGUF) quantized to ``kind`` by llama.cpp's own quantizer (as
    ``llama-quantize`` does: K-quants where rows fit their 256-wide blocks, its fallbacks elsewhere)."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[kind])
    params.nthread = threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ExportError(f"{target}: llama.cpp could not quantize {source.name} to {kind}")


class LlamaCppLM(nn.Module):
    """A GGUF model in llama.cpp behind the part of transformers' ``generate`` that ``tasks.causal_lm``
    uses (greedy decoding of token-id rows), so the run's own prompt framing and decoding are reused."""

    def __init__(self, llm, eos_id: int):
        super().__init__()
        self.llm, self.eos_id = llm, eos_id
        # Callers find the device through the model's parameters; a llama.cpp model runs on the CPU.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, do_sample: bool = False,
                 max_new_tokens: int = 64, pad_token_id: int | None = None, **_) -> torch.Tensor:
        if do_sample:
            raise ExportError("a GGUF export runs greedy decoding only (do_sample=False)")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ExportError("a GGUF export runs unpadded prompts only (one prompt per call)")
        rows = [ids + greedy(self.llm, ids, max_new_tokens, self.eos_id) for ids in input_ids.tolist()]
        width = max(map(len, rows))
        pad = self.eos_id if pad_token_id is None else pad_token_id
        return torch.tensor([row + [pad] * (width - len(row)) for row in rows])
