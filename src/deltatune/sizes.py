"""How big each method's delta is on a given model: `deltatune methods --model M`."""

from __future__ import annotations

import copy
import warnings

from transformers import AutoConfig

from .assets import resolve_model
from .components import supports
from .config import Config
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


def method_sizes(model_ref: str, task: str | None = None, num_labels: int = 2) -> list[dict]:
    """Trainable parameters of every method (default options) on this model and task."""
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
            options = method.Options()
            extra = method.load_kwargs(options)  # e.g. QLoRA needs its own quantized copy
            own = spec.build_model(path, **extra) if extra else copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = method.apply(own, options, spec)
        except DeltatuneError as exc:
            rows.append({**row, "error": str(exc).split(";")[0]})
            continue
        trainable, total = count_parameters(model)
        rows.append({**row, "trainable_params": trainable, "total_params": total,
                     "trainable_percent": round(100 * trainable / total, 4)})
    return rows
