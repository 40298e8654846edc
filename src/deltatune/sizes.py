"""How big each method's delta is on a given model: `deltatune methods --model M`."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from transformers import AutoConfig

from .assets import MODELS, resolve_model
from .components import supports
from .config import Config
from .configure import load_config
from .errors import DeltatuneError
from .methods import registry
from .models import count_parameters, load_tokenizer
from .tasks import registry as tasks


def default_task(model_ref: str) -> str:
    """The first registered task whose head fits the model's architecture (an encoder: a sequence head)."""
    archs = AutoConfig.from_pretrained(resolve_model(model_ref)).architectures or []
    head = ("seq2seq" if any(a.endswith("ForConditionalGeneration") for a in archs)
            else "causal" if any(a.endswith("ForCausalLM") for a in archs) else "sequence")
    return next(name for name in tasks.names() if tasks.get(name).head == head)


SHIPPED = Path(__file__).resolve().parents[2] / "configs"  # the repository's configs/<model alias>/<task>-<method>.yaml


def method_sizes(model_ref: str, task: str | None = None, num_labels: int = 2) -> list[dict]:
    """Trainable parameters of every method on this model and task: with the method's default options
    (``targets``: the layers a peft method adapted, peft's default for the architecture when unset) and,
    where the repository ships a config for this model, task and method, with that config's options."""
    task = task or default_task(model_ref)
    path = resolve_model(model_ref)
    labels = [f"label_{i}" for i in range(num_labels)]
    spec = tasks.get(task)(Config(task=task), pad_id=load_tokenizer(path).pad_token_id, labels=labels)
    base = spec.build_model(path)
    rows = []
    for name in registry.names():
        method = registry.get(name)
        row = {"method": name, "task": task}
        if supports(method, spec):
            rows.append({**row, "error": f"does not support {task}"})
            continue
        try:
            row.update(_size(method, method.Options(), spec, path, base))
        except DeltatuneError as exc:
            rows.append({**row, "error": str(exc).split(";")[0]})
            continue
        shipped = SHIPPED / model_ref / f"{task}-{name}.yaml"
        if model_ref in MODELS and shipped.is_file():
            options = load_config(shipped, [f"model={model_ref}"], check_paths=False).method.options
            row["shipped"] = {"config": f"configs/{model_ref}/{shipped.name}", **_size(method, options, spec, path, base)}
        rows.append(row)
    return rows


def _size(method, options, spec, path, base) -> dict:
    extra = method.load_kwargs(options)  # e.g. QLoRA needs its own quantized copy
    own = spec.build_model(path, **extra) if extra else copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.apply(own, options, spec)
    trainable, total = count_parameters(model)
    adapted = getattr(model, "peft_config", {}).get("default")
    targets = getattr(adapted, "target_modules", None)
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": round(100 * trainable / total, 4),
            **({"targets": sorted(targets) if isinstance(targets, (set, list)) else str(targets)} if targets else {})}
