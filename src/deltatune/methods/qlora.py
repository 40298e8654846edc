"""QLoRA (Dettmers et al., 2023): LoRA on a base whose linear weights are stored in 4 bits (NF4).

The frozen base is quantized by bitsandbytes as it loads (``W`` -> 4-bit codes + per-block
scales); each forward dequantizes block by block, so the frozen weights take about a quarter
of the memory. The trained delta is an ordinary LoRA adapter in peft's format.

``merge`` first dequantizes every 4-bit weight to fp32 exactly (``dequantize_4bit``), then folds
``(alpha / r) B A`` in, in fp32 (under DoRA, then scales each row to its trained magnitude). (Merging into the 4-bit weights would re-quantize the sum and
lose most of the update's precision.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import doc
from ..errors import ConfigError
from ..lazy import lazy
from ..models import replace_module
from .lora import CHANGES_BASE, Lora, LoraOptions
from .registry import register

torch = lazy("torch")
nn = lazy("torch.nn")

# Heads stay in full precision: they are new (classification) or tied to the embeddings (LM).
KEEP_FULL_PRECISION = ["classifier", "score", "lm_head"]


@dataclass
class QLoraOptions(LoraOptions):
    quant_type: str = doc("nf4", "4-bit data type of the frozen base: nf4 (normal float) or fp4.")
    double_quant: bool = doc(True, "Also quantize the per-block scales (saves ~0.4 bit per weight).")
    quantized_base = True

    def problems(self) -> list[str]:
        bad = [] if self.quant_type in ("nf4", "fp4") else [f"quant_type: use nf4 or fp4, got {self.quant_type!r}"]
        if self.init in CHANGES_BASE:
            bad.append(f"init: {self.init} cannot be used with qlora: it moves part of each base weight into B0 A0 "
                       "and leaves the residual as the frozen base, which qlora stores in 4 bits, so the saved "
                       "delta would not give the trained model back on a freshly quantized base (and peft refuses "
                       "PiSSA on 4-bit weights); use method.name=lora for it, or init default or gaussian")
        return super().problems() + bad


@register
class QLora(Lora):
    name = "qlora"
    can_merge = True
    quantized_base = True
    summary = "LoRA on a 4-bit NF4 base (bitsandbytes + peft)"
    Options = QLoraOptions
    default_lr = 2e-4  # Dettmers et al. 2023 (QLoRA): 2e-4 for 7B-13B models, 1e-4 for 33B-65B
    default_lr_source = "Dettmers et al. 2023 (QLoRA): 2e-4 for 7B and 13B models, 1e-4 for 33B and 65B"

    def load_kwargs(self, options: QLoraOptions) -> dict:
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
            bnb_4bit_use_double_quant=options.double_quant, bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=KEEP_FULL_PRECISION)}

    def search_space(self) -> dict:
        return {"r": [4, 8, 16, 32], "alpha": [8, 16, 32, 64]}

    def apply(self, model: nn.Module, options: QLoraOptions, task) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = super().apply(_exact_cpu_path(model), options, task)
        if options.init == "loftq":
            loftq_start(model)
        return model

    def load_delta(self, model: nn.Module, path, options, task) -> nn.Module:
        return super().load_delta(_exact_cpu_path(model), path, options, task)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        base = model.get_base_model()
        for name, module in list(base.named_modules()):
            if isinstance(module, LoraLayer):  # W = dequantize(W_4bit) + (alpha / r) B A, in fp32
                layer = module.get_base_layer()
                weight = _dequantized(layer)
                for adapter in module.active_adapters:
                    weight = _merged(module, adapter, weight)
                replace_module(base, name, _linear(weight, layer.bias))
            elif isinstance(module, ModulesToSaveWrapper):  # the trained copy of a head
                replace_module(base, name, module.modules_to_save[module.active_adapter])
        dequantize_4bit_layers(base)
        return base


def loftq_start(model: nn.Module) -> None:
    """LoftQ (Li et al. 2023) for a base quantized as it loaded: each LoRA layer's ``s B A`` starts as the best
    rank-r approximation (truncated SVD) of ``W - dequantize(Q(W))``, with ``W`` read from the model's own
    safetensors, so that ``Q(W) + s B A`` is as close to ``W`` as rank r allows. peft's
    ``replace_lora_weights_loftq`` does this on CUDA or XPU only, and sets ``B A`` (not ``s B A``) to the
    approximation; here the factors carry ``1 / sqrt(s)`` each, so the model starts at the approximation
    whatever alpha / r is. One pass: the 4-bit base is the one loaded, not re-quantized."""
    from peft.tuners.lora import Linear4bit
    from peft.utils.loftq_utils import _SafetensorLoader

    path = getattr(model.get_base_model().config, "_name_or_path", "")
    try:
        loader = _SafetensorLoader(model, str(path))  # model.safetensors or its shards
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError([f"method.init: loftq reads the base's original weights from its safetensors files, and "
                           f"{path or 'the model'} has none ({exc}); save the model with safetensors, or use "
                           "another init"]) from exc
    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            weight = loader.get_tensor(name[len(prefix):] + ".weight").float()
            error = weight - _dequantized(module.get_base_layer())
            u, s, vh = torch.linalg.svd(error, full_matrices=False)
            for adapter in module.lora_A:
                r, scale = module.r[adapter], module.scaling[adapter]
                root = (s[:r] / scale).sqrt()
                module.lora_B[adapter].weight.copy_(u[:, :r] * root)
                module.lora_A[adapter].weight.copy_(root[:, None] * vh[:r])


def _merged(module: nn.Module, adapter: str, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with one adapter folded in: ``W + s B A``, or under DoRA ``m * (W + s B A) / ||W + s B A||``
    with the norm over each output row, as peft's DoRA merge (its forward divides by the same norm)."""
    merged = weight + module.get_delta_weight(adapter).float()
    if adapter in module.lora_magnitude_vector:
        magnitude = module.lora_magnitude_vector[adapter].weight.float()
        merged = merged * (magnitude / merged.norm(p=2, dim=1)).view(-1, 1)
    return merged


def _exact_cpu_path(model: nn.Module) -> nn.Module:
    """On AVX512-BF16 CPUs bitsandbytes switches eval-mode 4-bit layers to a packed bf16 kernel, so
    evaluation would compute differently from training (and from the merged fp32 model). Keep the
    exact dequantize-then-fp32 path everywhere."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def _dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    if isinstance(layer, bnb.nn.Linear4bit):
        data, state = layer.weight.data, layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU inference layout
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
        return dequantize_4bit(data, state).float()
    return layer.weight.detach().float()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias.float())
    return plain


def dequantize_4bit_layers(model: nn.Module) -> None:
    """Replace every bitsandbytes ``Linear4bit`` by an fp32 ``nn.Linear`` with identical outputs."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            replace_module(model, name, _linear(_dequantized(module), module.bias))
    if hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config  # the saved model is plain fp32
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
        model.hf_quantizer = None
