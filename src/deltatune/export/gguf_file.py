"""Llama-family models and LoRA adapters as GGUF files: the subset of llama.cpp's own converters
(``convert_hf_to_gguf.py``'s ``LlamaModel``, ``convert_lora_to_gguf.py``) that a deltatune run needs,
written with the ``gguf`` package so that llama.cpp reads exactly what its converter would write.

Two things differ from a plain copy of the weights:
- llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3), ... of each head, where
  transformers rotates the two halves of a head (``rotate_half``); the rows of the Q and K projections
  are permuted so that both compute the same attention (``permute``). A LoRA update ``B A`` of Q or K is
  permuted the same way, which means permuting the rows of ``B``.
- llama.cpp's byte-level BPE tokenizer does not run the tokenizer's own pre-tokenizer: it picks one of its
  built-in splitting rules by name (``tokenizer.ggml.pre``), identified as llama.cpp's converter does, by
  the token ids the tokenizer gives a fixed text (``PRE_TOKENIZERS``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import ExportError

ARCH = gguf.MODEL_ARCH.LLAMA

# convert_hf_to_gguf.py's get_vocab_base_pre: this text's token ids, hashed, name the pre-tokenizer.
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
              "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {  # the Llama-family byte-level BPE tokenizers, from llama.cpp's table
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def llama_problem(config, tokenizer) -> str | None:
    """Why llama.cpp's ``llama`` architecture cannot hold this model and tokenizer exactly; None when it can."""
    if getattr(config, "model_type", None) != "llama":
        return (f"the base model is a {getattr(config, 'model_type', '?')} model; the GGUF export writes Llama-family "
                "decoders (model_type llama, e.g. SmolLM2)")
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope != "default":
        return f"its rotary embeddings are scaled ({rope}), which this export does not write"
    return tokenizer_problem(tokenizer)


def tokenizer_problem(tokenizer) -> str | None:
    try:
        pre_tokenizer(tokenizer)
    except ExportError as exc:
        return str(exc)
    return None


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (an ``ExportError`` when llama.cpp has none)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if (spec.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError("the tokenizer is not a byte-level BPE (GPT-2 style) tokenizer, the kind llama.cpp's "
                          "Llama-family GGUF files hold; export with --format hf or --format delta")
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ExportError(f"the tokenizer splits text in a way llama.cpp's known Llama-family tokenizers "
                          f"({', '.join(PRE_TOKENIZERS.values())}) do not (check hash {digest[:12]}); "
                          "export with --format hf or --format delta")
    return PRE_TOKENIZERS[digest]


def permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from transformers' halves layout to llama.cpp's interleaved pairs (as
    convert_hf_to_gguf.py's ``LlamaModel.permute``)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def rope_heads(hf_name: str, config) -> int | None:
    """How many heads the rows of this projection hold, when rotary embeddings apply to it (Q and K)."""
    if ".q_proj." in hf_name:
        return config.num_attention_heads
    if ".k_proj." in hf_name:
        return config.num_key_value_heads
    return None


def gguf_name(hf_name: str, config) -> str:
    names = gguf.get_tensor_name_map(ARCH, config.num_hidden_layers)
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"tensor {hf_name}: has no place in llama.cpp's llama architecture; this model is not a "
                          "plain Llama: export with --format hf")
    return found


def write_model(state: dict[str, torch.Tensor], config, tokenizer, eos_id: int, path: Path, dtype: str) -> None:
    """A transformers Llama ``state`` (a merged model's ``state_dict``) as a GGUF model file with its
    tokenizer; ``dtype`` f32 or f16 (matrices in f16, norms stay f32, as llama.cpp's converter does)."""
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hparams(writer, config)
    _tokenizer(writer, tokenizer, config, eos_id)
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        data = tensor.detach().float()
        if heads := rope_heads(hf_name, config):
            data = permute(data, heads)
        data = data.numpy()
        writer.add_tensor(gguf_name(hf_name, config), data.astype(np.float16) if dtype == "f16" and data.ndim == 2
                          else data)
    _write(writer)


def _hparams(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _tokenizer(writer: gguf.GGUFWriter, tokenizer, config, eos_id: int) -> None:
    """The vocabulary as convert_hf_to_gguf.py's ``_set_vocab_gpt2`` writes it: byte-level token strings,
    special added tokens as CONTROL, other added ones USER_DEFINED, ids the tokenizer lacks as UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(config.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.NORMAL if i not in added else
                     gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    bos = tokenizer.bos_token_id
    for add, value in ((writer.add_bos_token_id, bos), (writer.add_eos_token_id, eos_id),
                       (writer.add_unk_token_id, tokenizer.unk_token_id),
                       (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            add(value)
    # llama.cpp adds a BOS token when tokenizing only if the tokenizer does
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def write_lora(delta: Path, config, path: Path) -> None:
    """A peft LoRA adapter folder (``adapter_model.safetensors``) as llama.cpp's GGUF LoRA adapter:
    ``<base tensor>.lora_a`` (r x in) and ``.lora_b`` (out x r), scaled at run time by alpha / r."""
    settings = json.loads((delta / "adapter_config.json").read_text(encoding="utf-8"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(delta / "adapter_model.safetensors").items():
        stem, _, part = key.rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            raise ExportError(f"{delta / 'adapter_model.safetensors'}: tensor {key} is not a LoRA A or B matrix; "
                              "llama.cpp's LoRA adapters hold nothing else: export with --format gguf (merged)")
        pairs.setdefault(stem.removeprefix("base_model.model.") + ".weight", {})[part[0]] = tensor.float()
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings["lora_alpha"]))
    for hf_name, ab in sorted(pairs.items()):
        b = permute(ab["B"], heads) if (heads := rope_heads(hf_name, config)) else ab["B"]
        name = gguf_name(hf_name, config)
        writer.add_tensor(f"{name}.lora_a", ab["A"].contiguous().numpy())
        writer.add_tensor(f"{name}.lora_b", b.contiguous().numpy())
    _write(writer)


def _write(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
