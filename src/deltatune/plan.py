"""`deltatune plan`: peak memory and seconds per step of a config, predicted before training.

Nothing is trained and no weights are read. The model is built on PyTorch's meta device (shapes
only) and the method applied to it, so parameter and trainable counts are the real ones. The data
is prepared as `deltatune train` would (tokenizer only), so sequence lengths are the real padded
widths of the batches the run will see, in the run's own seeded order. Memory is a sum of terms:

    peak = framework + data + weights + gradients + AdamW states
           + max(activations + logits of the largest training batch, evaluation transients)

and time per step is FLOPs over this machine's matrix-product speed, measured at plan time (about
a second) at the torch thread count, times an efficiency calibrated per architecture family.
Every constant below says where it comes from. Checked against real runs by
benchmarks/plan_accuracy.py (figures in docs/scale.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from transformers import AutoConfig

from .assets import resolve_model
from . import allocator
from .config import Config, TrainConfig
from .errors import ArgumentError, ConfigError
from .methods import registry
from .models import count_parameters, head_class, load_tokenizer, transformer_layers
from .tasks import registry as tasks
from .tasks.base import Task
from .train.precision import bf16_enabled

MB = 2**20
# Floats saved for backward per token per transformer layer, in units of the hidden size, by
# architecture family and whether the base weights train (a frozen linear keeps no input). Exact
# counts (torch.autograd.graph.saved_tensors_hooks over one training forward, unique storages,
# parameters excluded; benchmarks/plan_accuracy.py --saved): minilm 18.5 full and frozen;
# smollm2-135m with a padding mask 21.0 full, 17.7 frozen.
ACTIVATION_FLOATS = {("encoder", True): 18.5, ("encoder", False): 18.5,
                     ("decoder", True): 21.0, ("decoder", False): 17.7}
# With attention dropout (BERT: 0.1) torch's CPU attention takes the unfused path and keeps the
# probabilities, the dropped probabilities and the mask: exactly 3 floats per head per key per token
# in the same count (minilm at lengths 64 and 128).
ATTENTION_PROB_FLOATS = 3.0
# A LoRA branch with dropout keeps its dropped input and the mask: 1.125 floats per input feature
# (same count: minilm lora minus full, smollm2 lora minus its frozen base).
ADAPTER_INPUT_FLOATS = 1.125
# With deltatune's fused paths (train.kernels at its default, rms_norm, swiglu and lora_dropout: deltatune/kernels)
# a layer keeps less: the share of the saved floats above (attention probabilities apart) that it still keeps,
# counted the same way with and without them (benchmarks/plan_accuracy.py --saved CONFIG train.kernels=[],
# width 64): smollm2-135m LoRA on q/k/v/o 22.2 -> 13.6 floats (q/v only: 18.3 -> 13.2), full 27.4 -> 22.7
# (SwiGLU keeps gate and up only; trained RMSNorms keep no normalised copy; LoRA branches keep their input once
# and boolean masks); minilm LoRA on query/key/value/dense 28.6 -> 20.6, full unchanged (no block of BERT's is
# fused). shared_lora_dropout instead of lora_dropout keeps about as much (smollm2 LoRA 14.1). Other sets are
# planned as none, and so is every set on glibc's malloc without train.return_freed_memory: its heap keeps the
# freed transients, and the peak moved by 4-6 % only (benchmarks/kernels.py).
FUSED_SAVED_SHARE = {("encoder", True): 1.0, ("encoder", False): 0.718,
                     ("decoder", True): 0.829, ("decoder", False): 0.614}
# Resident memory per saved byte, and per byte of fp32 weights, by malloc. glibc's ("system"), fitted by hand to
# the measured peak RSS of minilm full/lora (b32, l128: 1.17 and 1.49, taken as 1.3) and smollm2 lora (b4, l512,
# with and without checkpointing: 1.125, with the load factor) in benchmarks/plan_accuracy.py: temporaries of the
# forward (attention scores, dropout outputs) come on top of what backward keeps, and the heap keeps what loading
# freed (read, converted, copied: about 3x the weights). tcmalloc's (the default where present: allocator.py),
# fitted to the same four calibration runs on 2026-12-02 (the smallest largest error over a grid: 5 %): loading's
# memory is reused (factor 1.0), a decoder's saved bytes are resident one for one, an encoder's at 0.75 (its
# count includes BERT's dropout outputs, which the next operation often consumes before the peak).
RSS_PER_SAVED_BYTE = {"system": {"encoder": 1.3, "decoder": 1.125}, "tcmalloc": {"encoder": 0.75, "decoder": 1.0}}
LOAD_FACTOR = {"system": 3.0, "tcmalloc": 1.0}
# What loading frees stays resident, in blocks the size of the parameters: gradients and AdamW states
# (the same sizes) fill them again before they need new memory; activations (other sizes) do not.
# Without this, full fine-tuning was over-predicted by 14 % (minilm) and 39 % (smollm2; LoRA cases,
# whose gradients and states are small, are unchanged): the "reused" term, benchmarks/plan_accuracy.py.
# Logits of the plain causal-LM loss: the model's fp32 logits, the shifted copy that reshape makes,
# log-softmax and its gradient (4 copies of batch x length x vocabulary); see losses.causal_lm_loss.
LOGIT_COPIES = 4.0
# Python lists of token ids (input_ids, labels) and the rows they came from: about 120 bytes a token
# (a boxed int is 28 bytes plus an 8-byte pointer, two lists, plus the text).
DATA_BYTES_PER_TOKEN = 120.0
# Share of the micro-benchmark's matmul speed a whole training step reaches (small matrices, attention, norms,
# dropout, Python overhead), by CPU, family and whether the base weights train: step FLOPs / (GFLOP/s measured
# just before x step seconds), benchmarks/plan_accuracy.py. The project's machines come with two CPUs whose
# balance differs: the Intel Xeon's matrix products run at 1.8x the AMD EPYC's (318 against 180 GFLOP/s on 2
# threads) while its memory-bound rest does not, so a step reaches a smaller share of its probe there.
# Intel (--efficiency on an idle machine, steps after the first): minilm full b32 l128 0.51-0.55, minilm lora
# 0.25-0.31 (its LoRA branches' dropout and small products cost time that FLOPs do not count), smollm2 lora b4
# l512 packed 0.53-0.57; then the LoRA figures raised to 0.33 and 0.62, the middle of what the calibration runs
# of benchmarks/plan_accuracy.py needed (minilm lora 0.36, smollm2 lora 0.69 and with checkpointing 0.53).
# Decoder full fine-tuning was not calibrated: 0.55, the first LoRA figure (the held-out smollm2 full case
# checks it). AMD (plan_accuracy.py's runs of 2026-12-02, on tcmalloc with the default kernels, at the probe's
# 180 GFLOP/s): minilm full 0.81, minilm lora 0.56, smollm2 lora 0.72 and with checkpointing 0.76, taken as
# 0.81, 0.54 and 0.74; decoder full 0.85 from smollm2-full-b2-l256's 0.89 (the decoder LoRA figure planned it
# 1.26x too slow), so the cases held out of this calibration are minilm-full-b64-l128 and smollm2-full-b4-l128.
# Other CPUs: the mean of the two.
EFFICIENCY_BY_CPU = {
    "intel": {("encoder", True): 0.53, ("encoder", False): 0.33, ("decoder", True): 0.55, ("decoder", False): 0.62},
    "amd": {("encoder", True): 0.81, ("encoder", False): 0.54, ("decoder", True): 0.85, ("decoder", False): 0.74},
}
EFFICIENCY_BY_CPU["other"] = {k: (v + EFFICIENCY_BY_CPU["amd"][k]) / 2 for k, v in EFFICIENCY_BY_CPU["intel"].items()}
# Under bf16 autocast (train.bf16, where train/precision.py turns it on) the probe runs its product in bf16 and a
# step reaches this share of it: the casts around each product and the fp32 element-wise rest weigh more against
# products 4x as fast. Fitted on the AMD EPYC (bf16 products 4.1x fp32; plan_accuracy.py's runs of 2026-12-02,
# the probe warmed up): minilm full 0.55, smollm2 lora 0.31 and with checkpointing 0.29, decoder full 0.52 from
# smollm2-full-b2-l256; encoder LoRA needed 0.24, its checkpointed case 0.16 (BERT's recomputed forward, dropout
# and the unfused attention, costs more than its FLOPs): 0.20 keeps both within 25 % (so that case is not held
# out here). No other bf16-fast CPU was measured (an AMX Xeon would need its own figures).
BF16_EFFICIENCY = {("encoder", True): 0.55, ("encoder", False): 0.20, ("decoder", True): 0.52, ("decoder", False): 0.30}
# Saved for backward under autocast: a share of the fp32 count above per token (products keep bf16 copies of
# their inputs; norms, softmax and residuals stay fp32), counted as ACTIVATION_FLOATS were at widths 64/128/256
# (plan_accuracy.py --saved CONFIG train.bf16=true; minilm full 18.5 -> 12.9, lora 20.6 -> 17.5, smollm2 LoRA
# q/v 13.1 -> 8.3, full 16.1 -> 10.6 floats), plus the bf16 copy of every layer weight a product keeps (the
# width-independent part of the same counts: 2 bytes per layer weight, to 1 % on both models).
BF16_SAVED_SHARE = {("encoder", True): 0.69, ("encoder", False): 0.85, ("decoder", True): 0.66, ("decoder", False): 0.64}
# Resident on top under autocast: oneDNN's primitive cache (a bf16 kernel and its buffers per product shape
# seen; ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 measured 120 MB less on minilm lora, at 0.74x the speed) and cast
# transients. The calibration cases needed +39 (smollm2 lora, checkpointed) to +484 MB (smollm2 lora); 150 MB
# keeps all nine cases within 11 %.
BF16_RESIDENT_MB = 150.0
# Fused AdamW (train.loop.adamw) and gradient clipping: the fused step measured 15 ms for MiniLM's
# 22.7M parameters (0.66 ns each, 2 threads), the clipping norm one more pass: 1 ns per parameter.
OPTIMIZER_NS_PER_PARAM = 1.0
QUANT_BYTES_PER_WEIGHT = 0.52  # NF4: 4 bits plus one fp32 scale per 64 weights, double-quantised
ENCODERS = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta", "mpnet")


@dataclass
class Suggestion:
    change: list[str]  # key=value overrides
    why: str
    peak_mb: float
    seconds_per_step: float


@dataclass
class Plan:
    model: str
    method: str
    task: str
    total_params: int
    trainable_params: int
    batch_size: int
    mean_width: float  # mean padded length of the planned micro-batches
    max_width: int  # the longest one (it sets the memory peak)
    memory_mb: dict[str, float]
    peak_mb: float
    available_mb: float
    flops_per_step: float
    matmul_gflops: float
    seconds_per_step: float
    steps: int
    suggestions: list[Suggestion] = field(default_factory=list)
    malloc: str = "system"  # what train will run on (allocator.planned)
    precision: str = "fp32"  # bf16 where train.bf16 turns autocast on (train/precision.py)

    @property
    def fits(self) -> bool:
        return self.peak_mb <= self.available_mb


@dataclass
class Shape:
    """What the estimate needs from the model with its method applied."""
    family: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    attention_dropout: bool
    total_params: int
    trainable_params: int
    weight_bytes: float
    layer_linear: int  # weights of the linear layers inside the transformer blocks
    trainable_layer_linear: int
    depth: float  # share of layers that backward reaches (from the lowest trainable one up)
    trains_base: bool
    adapter_floats: float  # per token per layer: inputs kept by LoRA branches with dropout
    head_trains: bool
    cached_features: bool  # feature extraction: the encoder never runs in a step
    head_linear: bool = True  # a plain nn.Linear head: the chunked loss needs no recomputation


@dataclass
class Batches:
    """The planned micro-batches: padded width and predicted positions (causal LM) of each."""
    size: int
    widths: list[int]
    predicted: list[int]
    data_tokens: int


# ----------------------------------------------------------------------------- entry points

def plan(cfg: Config, memory_gb: float | None = None, gflops: float | None = None) -> Plan:
    """Predict the peak RSS (MB) and seconds per step of training ``cfg`` on this machine."""
    check_positive("--memory-gb", memory_gb, MEMORY_UNIT)
    check_positive("gflops", gflops, "GFLOP/s; leave it out to measure this machine")
    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id)
    if task.loop != "examples":
        raise ConfigError([f"task: plan predicts runs over fixed examples; {cfg.task} samples its own data "
                           "(its memory and time depend on generation): measure a few steps instead"])
    data = task.prepare(tokenizer)
    if data.train.examples and "input_ids" not in data.train.examples[0]:
        raise ConfigError([f"task: plan models one sequence per example; {cfg.task}'s examples hold several "
                           "(e.g. chosen and rejected, or a completion and its mismatched partner), which it does "
                           "not model yet: measure a few steps instead (train.max_steps=5) and read peak_rss_mb "
                           "and train_seconds in metrics.json"])
    shape = model_shape(path, task, cfg.method.name, cfg.method.options)
    batches = planned_batches(data.train.examples, data.eval.examples, cfg.train)
    bf16 = bf16_enabled(cfg.train.bf16, torch.device("cpu"))
    speed = gflops or matmul_gflops(shape.hidden, cfg.train.batch_size * 128,
                                    dtype=torch.bfloat16 if bf16 else torch.float32)
    available = memory_gb * 1024 if memory_gb is not None else available_mb()
    result = _estimate(cfg, shape, batches, speed, available)
    if not result.fits:
        result.suggestions = suggestions(cfg, path, data, shape, speed, available)
    return result


MEMORY_UNIT = "gigabytes, e.g. --memory-gb 16; leave it out to plan for the memory available now"


def check_positive(name: str, value: float | None, unit: str) -> None:
    """``ArgumentError`` unless ``value`` is None (not given) or a positive, finite number."""
    if value is not None and not (math.isfinite(value) and 0 < value < 1e15):
        raise ArgumentError(f"{name} {value:g}: must be a positive number of {unit}")


def _estimate(cfg: Config, shape: Shape, batches: Batches, speed: float, available: float) -> Plan:
    task = tasks.get(cfg.task)
    malloc = allocator.planned()
    bf16 = bf16_enabled(cfg.train.bf16, torch.device("cpu"))
    memory = memory_terms(shape, batches, cfg.train, task, malloc, bf16)
    train_part = memory["activations"] + memory["logits"]
    peak = sum(v for k, v in memory.items() if k not in ("activations", "logits", "evaluation"))
    peak += max(train_part, memory["evaluation"])
    flops = step_flops(shape, batches, cfg.train, task)
    efficiency = (BF16_EFFICIENCY if bf16 else EFFICIENCY_BY_CPU[cpu_vendor()])[(shape.family, shape.trains_base)]
    seconds = flops / (speed * 1e9 * efficiency)
    seconds += shape.trainable_params * OPTIMIZER_NS_PER_PARAM * 1e-9
    return Plan(model=cfg.model, method=cfg.method.name, task=cfg.task, total_params=shape.total_params,
                trainable_params=shape.trainable_params, batch_size=cfg.train.batch_size,
                mean_width=sum(batches.widths) / len(batches.widths), max_width=max(batches.widths),
                memory_mb={k: round(v / MB, 1) for k, v in memory.items()}, peak_mb=round(peak / MB, 1),
                available_mb=round(available, 1), flops_per_step=flops, matmul_gflops=round(speed, 1),
                seconds_per_step=round(seconds, 3), steps=_steps(cfg.train, len(batches.widths)), malloc=malloc,
                precision="bf16" if bf16 else "fp32")


# ----------------------------------------------------------------------------- the model's shape

def model_shape(path, task: Task, method_name: str, options) -> Shape:
    """Counts from the model built on the meta device with the method applied (no weights read);
    ``task`` (with its labels) says which head the base gets."""
    config = AutoConfig.from_pretrained(path)
    model = _meta_model(config, task)
    base_linear = {id(m.weight) for layer in transformer_layers(model) for m in layer.modules()
                   if isinstance(m, nn.Linear)}  # wrappers (peft) keep these tensors; adapters add new ones
    method = registry.get(method_name)
    quantized = _linear_weights(model, skip=("classifier", "score", "lm_head")) if method.quantized_base else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.apply(model, options, task)
    trainable, total = count_parameters(model)
    layers = transformer_layers(model)
    lowest = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                  len(layers))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and any(p.requires_grad for p in embeddings.parameters()):
        lowest = 0
    linear = [p for layer in layers for p in layer.parameters() if id(p) in base_linear]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "num_heads", 1)
    dropout = getattr(config, "attention_probs_dropout_prob", None) or getattr(config, "attention_dropout", 0.0)
    return Shape(
        family="encoder" if config.model_type in ENCODERS else "decoder", layers=len(layers),
        hidden=config.hidden_size, heads=heads, vocab=config.vocab_size, attention_dropout=bool(dropout),
        total_params=total, trainable_params=trainable,
        weight_bytes=4.0 * (total - quantized) + QUANT_BYTES_PER_WEIGHT * quantized,
        layer_linear=sum(p.numel() for p in linear),
        trainable_layer_linear=sum(p.numel() for layer in layers for p in layer.parameters()
                                   if p.requires_grad and p.ndim == 2),
        depth=(len(layers) - lowest) / max(len(layers), 1),
        trains_base=any(p.requires_grad for p in linear),
        adapter_floats=_adapter_inputs(layers) / max(len(layers), 1),
        head_trains=head is not None and any(p.requires_grad for p in head.parameters()),
        cached_features=method.caches_features, head_linear=type(head) is nn.Linear)


def _adapter_inputs(layers: nn.ModuleList) -> float:
    """Floats per token that LoRA branches keep (peft layers have ``lora_dropout`` and ``in_features``)."""
    total = 0.0
    for module in layers.modules():
        for dropout in getattr(module, "lora_dropout", {}).values() if hasattr(module, "in_features") else ():
            total += module.in_features * (ADAPTER_INPUT_FLOATS if getattr(dropout, "p", 0) > 0 else 1.0)
    return total


def _meta_model(config, task: Task) -> nn.Module:
    """The task's model (``models.head_class(task.head)``, as ``Task.build_model`` loads it), without weights."""
    labels = task.head_labels()
    if labels is not None:
        config.num_labels = len(labels)
    with torch.device("meta"):
        return head_class(task.head).from_config(config)


def _linear_weights(model: nn.Module, skip: tuple[str, ...]) -> int:
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(part in skip for part in name.split(".")))


# ----------------------------------------------------------------------------- the data

def planned_batches(train: list[dict], evaluation: list[dict], t: TrainConfig) -> Batches:
    """Widths of the micro-batches the run will train on, in its own seeded order (loop._epoch_loader)."""
    from torch.utils.data import DataLoader

    from .train.loop import length_grouped_batches

    lengths = [len(e["input_ids"]) for e in train]
    predicted = [sum(1 for x in e.get("labels", [])[1:] if x != -100) for e in train]
    wanted = t.max_steps * t.grad_accum  # max_steps wins over epochs, as in the loop
    widths, targets, epoch = [], [], 0
    while len(widths) < wanted if wanted else epoch < t.epochs:
        generator = torch.Generator().manual_seed(t.seed + epoch)
        if t.group_by_length:
            order = length_grouped_batches(lengths, t.batch_size, generator)
        else:
            order = [b.tolist() for b in DataLoader(range(len(lengths)), batch_size=t.batch_size, shuffle=True,
                                                    generator=generator)]
        widths += [max(lengths[i] for i in b) for b in order]
        targets += [sum(predicted[i] for i in b) for b in order]
        epoch += 1
    n = wanted or len(widths)  # a run stopped by max_steps ends inside an epoch
    tokens = sum(lengths) + sum(len(e["input_ids"]) for e in evaluation)
    return Batches(size=t.batch_size, widths=widths[:n], predicted=targets[:n], data_tokens=tokens)


def _steps(t: TrainConfig, micro_batches: int) -> int:
    return t.max_steps or -(-micro_batches // t.grad_accum)


# ----------------------------------------------------------------------------- memory and FLOPs

def fused(kernels) -> bool:
    """The kernel sets FUSED_SAVED_SHARE was counted for: rms_norm, swiglu and one of the LoRA dropouts."""
    return {"rms_norm", "swiglu"} <= set(kernels) and bool({"lora_dropout", "shared_lora_dropout"} & set(kernels))


def memory_terms(shape: Shape, batches: Batches, t: TrainConfig, task: type[Task],
                 malloc: str = "system", bf16: bool = False) -> dict[str, float]:
    """Bytes of each term on ``malloc`` (allocator.planned()), under bf16 autocast or not; ``activations``,
    ``logits`` and ``evaluation`` are transient."""
    tokens = batches.size * max(batches.widths)
    width = max(batches.widths)
    per_token = ACTIVATION_FLOATS[(shape.family, shape.trains_base)] * shape.hidden + shape.adapter_floats
    if fused(t.kernels) and (malloc == "tcmalloc" or t.return_freed_memory):
        per_token *= FUSED_SAVED_SHARE[(shape.family, shape.trains_base)]
    if shape.attention_dropout:
        per_token += ATTENTION_PROB_FLOATS * shape.heads * width
    layers = shape.layers * shape.depth
    if shape.cached_features:
        saved = 0.0
    elif t.gradient_checkpointing:  # each layer keeps its input; one layer at a time is recomputed
        saved = 4.0 * tokens * (shape.hidden * layers + per_token)
    else:
        saved = 4.0 * tokens * per_token * layers
    if bf16:  # less per token, plus the bf16 copies of the layers' weights that the products keep
        saved = saved * BF16_SAVED_SHARE[(shape.family, shape.trains_base)] + 2.0 * shape.layer_linear
    activations = saved * RSS_PER_SAVED_BYTE[malloc][shape.family]
    causal = task.head == "causal"  # a loss over the vocabulary
    positions = (min(max(batches.predicted), 256) if t.chunked_loss else tokens) if causal else 0
    logits = 4.0 * LOGIT_COPIES * positions * shape.vocab
    eval_rows = t.eval_batch_size * width
    evaluation = 4.0 * eval_rows * (4 * shape.hidden + (2 * shape.vocab if causal and not t.chunked_loss else 0))
    framework = framework_mb() + (BF16_RESIDENT_MB if bf16 else 0.0)
    return {"framework": framework * MB, "data": DATA_BYTES_PER_TOKEN * batches.data_tokens,
            "weights": shape.weight_bytes * LOAD_FACTOR[malloc], "gradients": 4.0 * shape.trainable_params,
            "optimizer": 8.0 * shape.trainable_params,
            "reused": -min(12.0 * shape.trainable_params, shape.weight_bytes * (LOAD_FACTOR[malloc] - 1)),
            "activations": activations, "logits": logits, "evaluation": evaluation}


def step_flops(shape: Shape, batches: Batches, t: TrainConfig, task: type[Task]) -> float:
    """Mean FLOPs of an optimizer step: forward 2 N T; backward 2 N T for input gradients (down to
    the lowest trainable layer) plus 2 N T for trained weights; recomputation when checkpointing."""
    # losses.chunked_causal_lm_loss: checkpointed chunks (a projection more) unless the head is a plain
    # linear, whose fused cross-entropy makes the gradients in forward.
    recomputes_head = t.chunked_loss and not shape.head_linear
    total = 0.0
    for width, predicted in zip(batches.widths, batches.predicted):
        tokens = batches.size * width
        linear = 0.0 if shape.cached_features else 2.0 * shape.layer_linear * tokens
        attention = 0.0 if shape.cached_features else 4.0 * batches.size * width**2 * shape.hidden * shape.layers
        backward = (linear + 2 * attention) * shape.depth + 2.0 * shape.trainable_layer_linear * tokens
        recompute = (linear + attention) * shape.depth if t.gradient_checkpointing else 0.0
        head = 0.0
        if task.head == "causal":  # forward, input gradient, the weight's if it trains, chunks recomputed
            rows = predicted if t.chunked_loss else tokens
            head = 2.0 * shape.hidden * shape.vocab * rows * (2 + shape.head_trains + recomputes_head)
        total += linear + attention + backward + recompute + head
    return total / len(batches.widths) * t.grad_accum


# ----------------------------------------------------------------------------- this machine

@functools.cache
def cpu_vendor() -> str:
    """intel, amd or other: which calibration of EFFICIENCY_BY_CPU this machine gets."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return "other"
    return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor, "other")


def matmul_gflops(hidden: int, rows: int, seconds: float = 1.0, dtype: torch.dtype = torch.float32) -> float:
    """Matrix-product speed in ``dtype`` at the model's width, on torch's threads (about ``seconds``)."""
    a, b = torch.randn(min(rows, 4096), hidden, dtype=dtype), torch.randn(hidden, 4 * hidden, dtype=dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds / 4:  # warm-up: a process's first bf16 products ran 20 % slower
        torch.mm(a, b)
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    return 2.0 * a.shape[0] * hidden * 4 * hidden * runs / (time.perf_counter() - start) / 1e9


def available_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux); elsewhere, total physical memory."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB


_FRAMEWORK: dict[str, float] = {}


def framework_mb() -> float:
    """Peak RSS of a process that has imported torch, transformers, peft and deltatune's trainer:
    measured once per library versions in a fresh process, then cached."""
    from .fs import atomic_write_text, cache_dir
    from .registry_db import library_versions

    key = json.dumps(library_versions(), sort_keys=True)
    if key in _FRAMEWORK:
        return _FRAMEWORK[key]
    file = cache_dir() / "plan" / "framework_rss.json"
    known = json.loads(file.read_text()) if file.is_file() else {}
    if key not in known:
        code = ("import resource, deltatune.train.run, deltatune.cli;"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        known[key] = float(out.split()[-1])
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(known))
    _FRAMEWORK[key] = known[key]
    return known[key]


# ----------------------------------------------------------------------------- when it does not fit

def suggestions(cfg: Config, path, data, shape: Shape, speed: float, available: float) -> list[Suggestion]:
    """Changes that bring the peak under ``available`` MB, each with its predicted figures."""
    t, out = cfg.train, []

    def trial(why: str, change: list[str], train: TrainConfig, new_shape: Shape = shape,
              method: str | None = None, options=None) -> None:
        new_cfg = dataclasses.replace(cfg, train=train)
        if method:
            new_cfg = dataclasses.replace(new_cfg, method=dataclasses.replace(cfg.method, name=method,
                                                                              options=options))
        batches = planned_batches(_truncated(data.train.examples, train), data.eval.examples, train)
        p = _estimate(new_cfg, new_shape, batches, speed, available)
        out.append(Suggestion(change, why, p.peak_mb, p.seconds_per_step))

    batch, accum = t.batch_size, t.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        trial("same effective batch, smaller micro-batches", [f"train.batch_size={batch}", f"train.grad_accum={accum}"],
              dataclasses.replace(t, batch_size=batch, grad_accum=accum))
        if out[-1].peak_mb <= available:
            break
    if not t.gradient_checkpointing and not shape.cached_features:
        trial("recompute layer activations in backward", ["train.gradient_checkpointing=true"],
              dataclasses.replace(t, gradient_checkpointing=True))
    if tasks.get(cfg.task).head == "causal" and not t.chunked_loss:
        trial("no full-vocabulary logits", ["train.chunked_loss=true"], dataclasses.replace(t, chunked_loss=True))
    quantized = _quantized_variant(cfg.method.name)
    if quantized:
        options = quantized.Options(**dataclasses.asdict(cfg.method.options))
        qshape = model_shape(path, tasks.get(cfg.task)(cfg, labels=data.labels), quantized.name, options)
        trial("4-bit base (slower steps on the CPU)", [f"method.name={quantized.name}"], t, qshape,
              quantized.name, options)
    if t.max_length > 64:
        trial("shorter examples (truncates the data)", [f"train.max_length={t.max_length // 2}"],
              dataclasses.replace(t, max_length=t.max_length // 2))
    return out


def _quantized_variant(method_name: str):
    """The registered method that is this one on a quantized base (QLoRA for LoRA): its base is
    quantized and its options extend this method's, so the current options carry over. Or None."""
    from .methods import registry

    method = registry.get(method_name)
    if method.quantized_base:
        return None
    return next((m for m in map(registry.get, registry.names())
                 if m.quantized_base and issubclass(m.Options, method.Options)), None)


def _truncated(examples: list[dict], t: TrainConfig) -> list[dict]:
    return [{**e, "input_ids": e["input_ids"][:t.max_length],
             **({"labels": e["labels"][:t.max_length]} if "labels" in e else {})} for e in examples]


# ----------------------------------------------------------------------------- output

def render(p: Plan) -> str:
    lines = [f"{p.model} / {p.method} / {p.task}: {p.trainable_params:,} of {p.total_params:,} parameters train",
             f"batch {p.batch_size}, padded length mean {p.mean_width:.0f}, max {p.max_width} "
             f"({p.steps} steps planned)", "", "memory (MB)"]
    lines += [f"  {k:12} {v:>10,.0f}" for k, v in p.memory_mb.items()]
    lines += [f"  {'peak':12} {p.peak_mb:>10,.0f}   (available {p.available_mb:,.0f}; on {p.malloc}'s malloc)",
              f"time: {p.seconds_per_step:.2f} s per step ({p.flops_per_step / 1e9:,.1f} GFLOP at "
              f"{p.matmul_gflops:.0f} {p.precision} GFLOP/s measured), "
              f"about {p.seconds_per_step * p.steps / 60:.1f} min in all"]
    if p.fits:
        lines.append("fits")
    else:
        lines.append("does NOT fit; each change below on its own:")
        lines += [f"  {' '.join(s.change):50} peak {s.peak_mb:>8,.0f} MB  {s.seconds_per_step:6.2f} s/step  "
                  f"{'fits' if s.peak_mb <= p.available_mb else 'still too big'}  ({s.why})"
                  for s in p.suggestions]
    return "\n".join(lines)


def plan_command(args) -> int:
    """``deltatune plan CONFIG [key=value ...] [--memory-gb G] [--json]``; exit 1 when it will not fit."""
    from .configure import load_config

    check_positive("--memory-gb", args.memory_gb, MEMORY_UNIT)  # before the config and the model load
    result = plan(load_config(args.config, args.overrides), memory_gb=args.memory_gb)
    print(json.dumps(dataclasses.asdict(result), indent=1) if args.json else render(result))
    return 0 if result.fits else 1
