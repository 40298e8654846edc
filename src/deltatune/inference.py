"""Load a finished run (base + delta) and use it: evaluate on new data, label texts, generate, score.

What a run predicts and how it is scored is its task's (``tasks/``): this module loads and dispatches.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from torch import nn

from .config import Config
from .configure import load_config
from .errors import DeltatuneError, RunError
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
        return fresh_base(self.task, self.cfg, self.method)


def fresh_base(task: Task, cfg: Config, method: Method) -> nn.Module:
    """The base model with the task's head as training built it: a new head (classification, tagging) drawn
    from the run's seed, as train/run.py seeds just before building the model, so that it is the head the
    run's baseline was measured with (and the one a switched-off delta falls back to), the same at every
    load. The caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return task.build_model(cfg.model, **method.load_kwargs(cfg.method.options))


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
    changed the base weights) a fresh copy of the base, loaded for the occasion, its new head (if any)
    drawn from the run's seed (``fresh_base``)."""
    method = methods.get(loaded.cfg.method.name)
    if method.switchable_off:
        with method.switched_off(loaded.model) as base:
            yield base
    else:
        yield fresh_base(loaded.task, loaded.cfg, method).to(loaded.device).eval()


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


SAMPLES = "samples.jsonl"


def sample_answers(loaded: LoadedRun, n: int = 5, max_new_tokens: int = 48) -> list[dict]:
    """What the base model and the tuned one answer on the first ``n`` rows of the run's own evaluation split:
    ``{"prompt", "reference", "before", "after"}`` strings per row (the Run page's samples), greedy.

    A run keeps no copy of its data, only its config and the data's fingerprint (data.json). The task's
    pipeline on the configured files is deterministic (its split is seeded by the run's seed), so the same
    files give the same split back; the fingerprint of the rows made again is checked against the run's, and
    a run whose files changed or are gone is refused rather than shown rows it never held out."""
    task = loaded.task
    pairs = [task.sample_input(row) for row in held_out_rows(loaded, n)]
    texts = [text for text, _ in pairs]
    after = predict(loaded, texts, max_new_tokens)
    with _base_model(loaded) as base:
        before = task.predict(base, loaded.tokenizer, texts, max_new_tokens)
    return [{"prompt": text, "reference": reference, "before": task.answer_text(b), "after": task.answer_text(a)}
            for (text, reference), b, a in zip(pairs, before, after)]


def held_out_rows(loaded: LoadedRun, n: int) -> list[dict]:
    """The first ``n`` prepared rows of the run's evaluation split (its test split if it has no evaluation
    rows), made again from its config; a ``RunError`` when they cannot be the rows the run held out."""
    run, cfg = loaded.run, loaded.cfg
    try:
        rows = loaded.task.rows()
    except (DeltatuneError, OSError) as exc:
        raise RunError(f"{run.path}: the run's held-out rows cannot be made again: its data cannot be read "
                       f"({_first_line(exc)}); put {cfg.data.train} back where config.yaml says") from exc
    if rows.report["fingerprint"] != run.read_json("data.json").get("fingerprint"):
        raise RunError(f"{run.path}: the run's data files changed since training (their fingerprint differs from "
                       f"data.json's), so its held-out rows cannot be made again; restore {cfg.data.train} as it "
                       "was, or try the model on texts of your own: deltatune predict RUN --text ...")
    split = "eval" if rows.splits["eval"] else "test"
    if not rows.splits[split]:
        raise RunError(f"{run.path}: the run held out no evaluation or test rows; nothing to sample from")
    return rows.splits[split][:n]


def kept_samples(run: RunDir) -> str | None:
    """Why the run's samples.jsonl must stay (PPO and GRPO write their own during training), or None when
    there is none or it holds held-out answers (rows with a reference: ``eval --samples`` wrote them)."""
    file = run.path / SAMPLES
    if not file.is_file():
        return None
    try:
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError:
        rows = [{}]
    if rows and all(isinstance(r, dict) and "reference" in r for r in rows):
        return None
    return (f"{file}: the run's training wrote these samples (e.g. PPO or GRPO: responses before and after, "
            "with rewards); they are kept, not replaced by held-out answers")


def write_sample_answers(path: str | Path, n: int = 5, max_new_tokens: int = 48) -> list[dict]:
    """``sample_answers`` of a completed run, written to RUN/samples.jsonl (atomically: whole or not at all).
    Samples its training wrote (PPO, GRPO) are never replaced: a ``RunError`` says so."""
    run = RunDir(Path(path))
    run.require_complete()
    if why := kept_samples(run):
        raise RunError(why)
    loaded = load_run(path)
    rows = sample_answers(loaded, n, max_new_tokens)
    run.write_jsonl(SAMPLES, rows)
    return rows
