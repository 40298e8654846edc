"""Load a finished run (base + delta) and use it: evaluate on new data, label texts, generate, score.

What a run predicts and how it is scored is its task's (``tasks/``): this module loads and dispatches.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

from .config import Config
from .configure import load_config
from .errors import RunError
from .methods import registry as methods
from .methods.base import Method
from .models import load_tokenizer
from .rundir import RunDir, check_safetensors
from .tasks import registry as tasks
from .tasks.base import Task


@dataclass
class LoadedRun:
    run: RunDir
    cfg: Config
    model: nn.Module
    tokenizer: object
    task: Task  # bound to the run's settings and labels

    @property
    def labels(self) -> list[str] | None:
        return self.task.labels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@dataclass
class RunParts:
    """What a completed run is, without its model: config, tokenizer, method, and its task bound to the run's
    settings and labels (``serve`` reads these to decide which runs can share a base)."""
    run: RunDir
    cfg: Config
    tokenizer: object
    method: Method
    task: Task

    def build_base(self) -> nn.Module:
        """The untouched base model with the task's head, loaded as the method loads it (QLoRA: quantized)."""
        return self.task.build_model(self.cfg.model, **self.method.load_kwargs(self.cfg.method.options))


def read_run(path: str | Path) -> RunParts:
    """A completed run's config, tokenizer, method and task; a truncated or corrupted tokenizer is a
    ``RunError`` naming the file and what to do."""
    run = RunDir(Path(path))
    run.require_complete()
    cfg = load_config(run.config, check_paths=False)
    labels = run.read_json("labels.json")["labels"] if (run.path / "labels.json").is_file() else None
    try:
        tokenizer = load_tokenizer(run.tokenizer)
    except Exception as exc:  # tokenizers (Rust) raises a bare Exception for a damaged tokenizer.json
        raise RunError(f"{run.tokenizer}: the run's tokenizer cannot be loaded ({_first_line(exc)}); "
                       f"{damaged_hint(run, 'tokenizer')}") from exc
    method = methods.get(cfg.method.name)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id, labels=labels)
    return RunParts(run, cfg, tokenizer, method, task)


def load_run(path: str | Path) -> LoadedRun:
    """A completed run's model (base + delta), tokenizer and task. A missing, truncated or corrupted
    delta or tokenizer is a ``RunError`` naming the file and what to do, not a library's traceback."""
    parts = read_run(path)
    return LoadedRun(parts.run, parts.cfg, tuned_model(parts), parts.tokenizer, parts.task)


def tuned_model(parts: RunParts) -> nn.Module:
    """The run's base with its delta, on the device, in evaluation mode."""
    model = load_delta(parts.run, parts.method, parts.build_base(), parts.cfg, parts.task, damaged_hint(parts.run))
    return on_device(model)


def on_device(model: nn.Module) -> nn.Module:
    """The model on the GPU when there is one, as in training, in evaluation mode."""
    return model.to(PartialState().device).eval()


def damaged_hint(run: RunDir, part: str = "delta") -> str:
    """What to do when a completed run's ``part`` (delta or tokenizer) is damaged: a completed run keeps
    no checkpoint, so restore the folder from a copy, or train again."""
    return (f"restore {run.path / part} from a good copy of this run (a delta export of it, `deltatune export "
            f"RUN`, holds a copy of both delta and tokenizer), or train it again: deltatune train {run.config} "
            "output_dir=NEW_DIR")


def load_delta(run: RunDir, method, base: nn.Module, cfg: Config, task: Task, hint: str) -> nn.Module:
    """``method.load_delta`` with the delta's files checked first: a missing folder or weights file,
    a truncated or corrupted one, is a ``RunError``."""
    check_delta(run, hint)
    from safetensors import SafetensorError

    try:
        return method.load_delta(base, run.delta, cfg.method.options, task)
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # e.g. a missing or damaged adapter_config.json
        raise RunError(f"{run.delta}: the run's delta cannot be loaded ({_first_line(exc)}); {hint}") from exc


def check_delta(run: RunDir, hint: str) -> None:
    """A ``RunError`` when the run's delta folder or weights are missing, truncated or corrupted."""
    if not run.delta.is_dir():
        raise RunError(f"{run.delta}: the run's delta folder is missing; {hint}")
    weights = sorted(run.delta.rglob("*.safetensors"))
    if not weights:
        raise RunError(f"{run.delta}: no .safetensors weights file in the run's delta; {hint}")
    for file in weights:
        check_safetensors(file, hint)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def evaluate_file(loaded: LoadedRun, data_path: str) -> dict:
    """Metrics of the tuned model on another file (read with the run's columns and label set;
    for a task that compares with the base model, e.g. dpo, the base is the reference)."""
    task = loaded.task
    examples = task.file_examples(data_path, loaded.tokenizer)
    examples = methods.get(loaded.cfg.method.name).prepare_examples(loaded.model, examples)
    if task.needs_reference:
        with _base_model(loaded) as reference:
            examples = task.with_reference(reference, examples)
    return task.evaluate(loaded.model, examples)


@contextmanager
def _base_model(loaded: LoadedRun):
    """The base model of a loaded run: its delta switched off where the method can, or (methods that
    changed the base weights) a fresh copy of the base, loaded for the occasion."""
    method = methods.get(loaded.cfg.method.name)
    if method.switchable_off:
        with method.switched_off(loaded.model) as base:
            yield base
    else:
        cfg = loaded.cfg
        base = loaded.task.build_model(cfg.model, **method.load_kwargs(cfg.method.options))
        yield base.to(loaded.device).eval()


def score(loaded: LoadedRun, prompts: list[str], responses: list[str]) -> list[float]:
    """A reward model's score of each (prompt, response), formatted and truncated as in training."""
    try:
        return loaded.task.score(loaded.model, loaded.tokenizer, prompts, responses)
    except RunError as exc:
        raise RunError(f"{loaded.run.path}: {exc}") from exc


def predict(loaded: LoadedRun, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
    """Labels with probabilities, tags or generated text: what the run's task predicts."""
    try:
        return loaded.task.predict(loaded.model, loaded.tokenizer, texts, max_new_tokens)
    except RunError as exc:
        raise RunError(f"{loaded.run.path}: {exc}") from exc


