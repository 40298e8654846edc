"""Bottleneck adapters (Houlsby et al., 2019; the Pfeiffer et al., 2020 placement as an option).

After a sub-layer's output projection, before its residual sum and layer norm, an adapter adds

    h <- h + W_up f(W_down h),   W_down: d -> m,  W_up: m -> d,  m << d

with ``f`` a non-linearity. ``W_up`` starts at zero, so at initialisation the model computes
exactly what the base computes. Placement ``houlsby`` puts one adapter after the attention
output and one after the feed-forward output of every layer; ``pfeiffer`` only after the
feed-forward. As in the paper, the layer norms and the task head train too. The non-linearity
rules out merging: the adapters stay as (cheap) extra modules at inference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import doc
from ..errors import CannotMerge, DeltatuneError
from ..lazy import lazy
from ..models import head_parameter_names, replace_module
from .base import Method, set_trainable
from .registry import register

nn = lazy("torch.nn")

# Output projections of the attention and feed-forward sub-layers, by architecture.
SITES = {
    "bert": (r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"),
    "llama": (r"self_attn\.o_proj$", r"mlp\.down_proj$"),
    "t5": (r"(SelfAttention|EncDecAttention)\.o$", r"DenseReluDense\.wo$"),
}
ACTIVATIONS = {"relu": "ReLU", "gelu": "GELU", "tanh": "Tanh", "swish": "SiLU"}  # torch.nn classes


@dataclass
class AdapterOptions:
    bottleneck: int | None = doc(None, "Adapter width m; if unset, hidden size / reduction_factor.")
    reduction_factor: int = doc(16, "Hidden size divided by this gives the bottleneck (when bottleneck is unset).")
    placement: str = doc("houlsby", "houlsby: after attention and feed-forward; pfeiffer: after feed-forward only.")
    non_linearity: str = doc("relu", f"Activation inside the adapter: {', '.join(ACTIVATIONS)}.")
    train_layer_norms: bool = doc(True, "Train the layer norms as well (as Houlsby et al. do).")

    def problems(self) -> list[str]:
        out = []
        if self.placement not in ("houlsby", "pfeiffer"):
            out.append(f"placement: use houlsby or pfeiffer, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            out.append(f"non_linearity: use one of {', '.join(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.bottleneck is not None and self.bottleneck < 1:
            out.append(f"bottleneck: must be at least 1, got {self.bottleneck}")
        if self.reduction_factor < 1:
            out.append(f"reduction_factor: must be at least 1, got {self.reduction_factor}")
        return out


def adapter_sites(model: nn.Module, placement: str) -> list[str]:
    model_type = getattr(model.config, "model_type", "")
    if model_type not in SITES:
        raise DeltatuneError(f"houlsby adapters: no known sub-layer outputs for model type {model_type!r} "
                             f"(supported: {', '.join(SITES)}); use lora instead")
    attention, ffn = SITES[model_type]
    patterns = [ffn] if placement == "pfeiffer" else [attention, ffn]
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(re.search(p, name) for p in patterns)]


@register
class Houlsby(Method):
    name = "houlsby"
    can_merge = False
    traceable = True  # adapters are plain layers inside the model
    summary = "bottleneck adapters after attention and feed-forward (+ layer norms, head)"
    Options = AdapterOptions
    default_lr = 3e-4  # Houlsby et al. 2019: GLUE grid 3e-5, 3e-4, 3e-3 (the middle)
    default_lr_source = "Houlsby et al. 2019 (adapters): GLUE grid 3e-5, 3e-4, 3e-3; the middle value"

    def search_space(self) -> dict:
        return {"reduction_factor": [8, 16, 32, 64]}

    def apply(self, model: nn.Module, options: AdapterOptions, task) -> nn.Module:
        from .houlsby_layers import Adapter, WithAdapter

        head = set(head_parameter_names(model))
        for name in adapter_sites(model, options.placement):
            base = model.get_submodule(name)
            width = options.bottleneck or max(1, base.out_features // options.reduction_factor)
            adapter = Adapter(base.out_features, width, options.non_linearity).to(base.weight.device)
            replace_module(model, name, WithAdapter(base, adapter))
        norms = {f"{n}." for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}

        def trains(name: str) -> bool:
            in_norm = options.train_layer_norms and any(name.startswith(n) for n in norms)
            return ".adapter." in name or name in head or in_norm

        set_trainable(model, trains)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise CannotMerge("houlsby: an adapter applies a non-linearity, so it cannot be folded into the "
                          "base weights; serve the run directory (base + adapters), or train lora or ia3 "
                          "if you need a merged model")
