"""Base model and tokenizer for a task, plus the few structural facts methods need."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .assets import resolve_model
from .lazy import lazy

if TYPE_CHECKING:
    from transformers import PreTrainedModel

torch = lazy("torch")
nn = lazy("torch.nn")
transformers = lazy("transformers")
hf_logging = lazy("transformers.utils.logging")


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds only this process's shard of its parameters (FSDP 2: docs/scale.md)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded before it is imported (slow to import)
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def load_tokenizer(path: str | Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


HEADS = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification",
         "causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM"}


def head_class(head: str) -> type:
    """The transformers auto class that loads a base model with ``head`` (a key of ``HEADS``)."""
    return getattr(transformers, HEADS[head])


def load_model(model_ref: str | Path, head: str, labels: list[str] | None = None,
               pad_token_id: int | None = None, **extra) -> PreTrainedModel:
    """The untouched base model with a head (``HEADS``: what a task's ``head`` names), in fp32,
    safetensors only, no remote code. ``labels`` name the outputs of a sequence or token head (a new
    head; a reward model's is one output). ``extra`` comes from the method (e.g. QLoRA's
    quantization_config)."""
    path = resolve_model(str(model_ref))
    kwargs = dict(dtype=torch.float32, use_safetensors=True, trust_remote_code=False, **extra)
    if labels is not None:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={name: i for i, name in enumerate(labels)})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    try:
        model = head_class(head).from_pretrained(path, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if labels is not None and model.config.pad_token_id is None:  # decoders need it to find the last real token
        model.config.pad_token_id = pad_token_id
    return model


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList of identical blocks."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ValueError(f"{type(model).__name__}: cannot find its transformer layers")
    return best


def head_parameter_names(model: PreTrainedModel) -> list[str]:
    """Parameters outside the backbone (e.g. ``classifier.*``, ``score.*``, an untied ``lm_head``)."""
    tied = _tied_to_input_embeddings(model)
    prefix = model.base_model_prefix
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        outside = [(n, p) for n, p in model.named_parameters() if not n.startswith(prefix + ".")]
    else:  # the backbone sits at the top level (T5): only the output projection is a head
        out = model.get_output_embeddings()
        own = {id(p) for p in out.parameters()} if out is not None else set()
        outside = [(n, p) for n, p in model.named_parameters() if id(p) in own]
    return [n for n, p in outside if id(p) not in tied]


def head_module_names(model: PreTrainedModel) -> list[str]:
    """Top-level modules that make up the head (what peft's ``modules_to_save`` should hold)."""
    return sorted({n.split(".")[0] for n in head_parameter_names(model)})


def _tied_to_input_embeddings(model: PreTrainedModel) -> set[int]:
    emb = model.get_input_embeddings()
    return {id(p) for p in emb.parameters()} if emb is not None else set()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared tensors once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        quant = getattr(p, "quant_state", None)  # a 4-bit weight stores two values per byte
        n = quant.shape.numel() if quant is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the dotted ``name`` points inside ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
