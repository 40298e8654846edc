"""Which finished runs share a base model, and how a batch reaches its delta.

Runs of peft methods (LoRA, QLoRA, IA3, soft prompts) whose base would load the same way (model folder,
head and its number of outputs, the method's load arguments such as QLoRA's quantization, peft's
adapter type, pad token) form a ``Group``: the base is loaded once and every run's delta is a named
adapter of one ``PeftModel``. peft holds one adapter type per model, so LoRA and IA3 runs on the same
base are two groups. Runs of other methods (full, freeze, bitfit, houlsby, feature extraction) change
or wrap the base weights and load as their own model (``inference.load_run``): a group of one. Each
distinct base model is also served by name; without a peft group to hold it, it is loaded plainly.

A batch names its rows' deltas. LoRA computes mixed batches in one forward (peft's ``adapter_names``,
``"__base__"`` for the base), and a batch of one delta through peft's plain path (``set_adapter``: the
mixed path costs a hook on every adapted layer per forward); other adapter types run one delta per batch (``set_adapter``, the base with
the adapter switched off). Soft prompts differ only in what the first forward puts before the text:
once their virtual tokens are in the KV cache, decoding is the base model's and their rows mix freely.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from torch import nn

from ..assets import resolve_model
from ..errors import DeltatuneError
from ..export.load import export_format, is_export, load_export, read_export, read_manifest
from ..inference import RunParts, check_delta, damaged_hint, load_delta, load_run, on_device, read_run
from ..methods.peft_common import PeftMethod
from ..tasks.base import Task
from .types import Served

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class Member:
    """One served name: a delta in a group (``adapter``), a group's base (``adapter`` None), or a run loaded
    as its own model."""
    served: Served
    group: Group
    adapter: str | None
    tokenizer: object
    task: Task | None = None  # the run's task, bound to its settings and labels; None for a base
    chat_template: bool = True
    max_length: int | None = None  # truncation of classify/embed/score texts (the run's train.max_length)
    inflight: int = 0  # queued or running requests (the scheduler's lock guards it)
    closing: bool = False  # being unloaded: no new requests

    def can(self, op: str) -> bool:
        if op == "embed":
            return self.group.encoder
        if op == "classify":
            return self.served.kind in ("classify", "tag")
        return op == self.served.kind


@dataclass(eq=False)
class Group:
    """One loaded model and the served names on it."""
    key: tuple
    model: nn.Module
    tokenizer: object  # pads one-shot batches (the group's runs share a pad token: it is in the key)
    head: str  # models.HEADS: causal | seq2seq | sequence | token
    folder: Path  # the base model's folder
    peft_type: str | None = None  # None: a plain model (a base, or a run loaded as its own model)
    members: list[Member] = field(default_factory=list)
    adapters: int = 0  # adapters loaded so far (peft's "default" first, then d1, d2, ...)
    _active: str | None = None

    @property
    def encoder(self) -> bool:
        """Its hidden states embed texts: an encoder-only model (one with a masked-LM head) under a sequence
        or token head."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        config = getattr(self.model, "config", None)
        return self.head in ("sequence", "token") and getattr(config, "model_type", None) in \
            MODEL_FOR_MASKED_LM_MAPPING_NAMES

    @property
    def vocab_size(self) -> int | None:
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        return getattr(embeddings, "num_embeddings", None)

    @property
    def mixable(self) -> bool:
        """Rows of different deltas share a forward (peft's mixed batches: LoRA only)."""
        return self.peft_type == "LORA"

    @property
    def prompt_learning(self) -> bool:
        return self.peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING")

    @property
    def encoder_decoder(self) -> bool:
        return self.head == "seq2seq"

    def batch_key(self, member: Member, decoding: bool = False) -> object:
        """Requests with equal keys share a batch: every row of a LoRA group; soft-prompt rows once their
        prompt is in the KV cache; else one delta per batch."""
        if self.peft_type is None or self.mixable or (decoding and self.prompt_learning):
            return "all"
        return member.adapter

    @contextmanager
    def routed(self, adapters: list[str | None]) -> Iterator[nn.Module]:
        """The model computing each row with its delta (``adapters``: one per row, None for the base)."""
        model = self.model
        if self.peft_type is None:
            yield model
        elif self.mixable and len(set(adapters)) > 1:
            yield Routed(model, [a or BASE for a in adapters])
        else:  # one delta for the whole batch: peft's plain path (adapter_names costs hooks on every layer)
            (adapter,) = set(adapters)
            if adapter is None and self.prompt_learning:
                yield model.get_base_model()  # the virtual tokens live outside the wrapped model
            elif adapter is None:
                with model.disable_adapter():
                    yield model
            else:
                self._activate(adapter)
                yield model

    def decoder(self, adapters: list[str | None]):
        """The model for decoding steps: a soft prompt's virtual tokens are in the cache already."""
        if self.prompt_learning:
            return nullcontext(self.model.get_base_model())
        return self.routed(adapters)

    def _activate(self, adapter: str) -> None:
        if self._active != adapter:
            self.model.set_adapter(adapter)
            self._active = adapter

    # ------------------------------------------------------------------ deltas

    def attach(self, parts: RunParts) -> str:
        """Load a run's delta as one more named adapter (in the worker thread: no forward runs meanwhile)."""
        check_delta(parts.run, damaged_hint(parts.run))
        name = f"d{self.adapters}"
        self.model.load_adapter(str(parts.run.delta), adapter_name=name, is_trainable=False)
        self.adapters += 1
        on_device(self.model)
        self._active = None
        return name

    def detach(self, member: Member) -> None:
        """Drop a member; its adapter goes too unless it is the model's last (peft keeps at least one)."""
        self.members.remove(member)
        adapters = list(getattr(self.model, "peft_config", {}))
        if member.adapter is not None and len(adapters) > 1:
            self.model.delete_adapter(member.adapter)
            self._active = None


class Routed:
    """A PeftModel whose every call names each row's adapter (peft's mixed-batch inference)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.model, self.names = model, names

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **inputs):
        return self.model(**inputs, adapter_names=self.names)


def kind_of(task: Task) -> str:
    if task.generates or task.head in ("causal", "seq2seq"):
        return "generate"
    if task.scores_responses:
        return "score"
    return "tag" if task.head == "token" else "classify"


def read_parts(path: str | Path) -> RunParts:
    """A run folder's parts, or an export folder's (``deltatune export``: served as its runtime runs it).
    GGUF exports are refused: the engine decodes step by step on a PyTorch KV cache, which llama.cpp's
    files do not give."""
    if not is_export(path):
        return read_run(path)
    fmt = export_format(read_manifest(Path(path)))
    if fmt.startswith("gguf"):
        raise DeltatuneError(f"{path}: a {fmt} export runs in llama.cpp, which deltatune serve does not drive; "
                             "serve the run itself (--run NAME=RUN_DIR) or its hf export, or this file with "
                             "llama.cpp's own OpenAI-compatible server (llama-server -m FILE.gguf)")
    return read_export(path)


def group_key(parts: RunParts) -> tuple | None:
    """What must be equal for runs to share one loaded base; None: the run loads as its own model (so does
    an export: the artefact itself is served)."""
    if not isinstance(parts.method, PeftMethod) or is_export(parts.run.path):
        return None
    adapter = json.loads((parts.run.delta / "adapter_config.json").read_text()) \
        if (parts.run.delta / "adapter_config.json").is_file() else {}
    if adapter.get("use_dora"):  # peft refuses mixed batches of DoRA adapters: such a run gets a model of its own
        return None
    head_labels = parts.task.head_labels()
    load = json.dumps(parts.method.load_kwargs(parts.cfg.method.options), sort_keys=True,
                      default=lambda v: v.to_dict() if hasattr(v, "to_dict") else repr(v))
    return (str(base_folder(parts)), parts.task.head, None if head_labels is None else len(head_labels), load,
            adapter.get("peft_type"), parts.tokenizer.pad_token_id)


def base_folder(parts: RunParts) -> Path:
    return Path(resolve_model(str(parts.cfg.model))).resolve()


def member_for(parts: RunParts, name: str, group: Group, adapter: str | None, base_name: str) -> Member:
    task, cfg = parts.task, parts.cfg
    served = Served(name, kind_of(task), task.name, cfg.method.name, str(parts.run.path), base_name, task.labels)
    return Member(served, group, adapter, parts.tokenizer, task, cfg.data.chat_template, cfg.train.max_length)


def load_group(parts: RunParts) -> tuple[Group, str | None]:
    """A new group for a run: its base with the delta as the first adapter, or the run as its own model.
    Returns the group and the run's adapter name (None for its own model)."""
    folder = base_folder(parts)
    key = group_key(parts)
    if key is None:
        loaded = load_export(parts.run.path, verify=False) if is_export(parts.run.path) else load_run(parts.run.path)
        return Group(("run", str(parts.run.path)), loaded.model, parts.tokenizer, parts.task.head, folder), None
    model = load_delta(parts.run, parts.method, parts.build_base(), parts.cfg, parts.task, damaged_hint(parts.run))
    group = Group(key, on_device(model), parts.tokenizer, parts.task.head, folder, key[4], adapters=1)
    return group, "default"  # peft's name for the adapter from_pretrained loads


def load_plain_base(parts: RunParts) -> Group:
    """The untouched base of a run whose method keeps no separate delta (its base is served by name)."""
    model = on_device(parts.build_base())
    return Group(("base", str(base_folder(parts)), parts.task.head), model, parts.tokenizer, parts.task.head,
                 base_folder(parts))


def base_member(group: Group, name: str) -> Member:
    kind = "generate" if group.head in ("causal", "seq2seq") else "embed"
    task = {"causal": "causal_lm", "seq2seq": "seq2seq"}.get(group.head, "embedding")
    max_length = getattr(getattr(group.model, "config", None), "max_position_embeddings", None)
    return Member(Served(name, kind, task, None, None, name, None), group, None, group.tokenizer,
                  max_length=max_length)

