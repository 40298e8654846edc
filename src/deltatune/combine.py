"""`deltatune merge-deltas`: several deltas trained one task each, combined into one run.

The deltas' shared part (LoRA's B A on the encoder) is combined by the method (``Method.combine``: peft's
``add_weighted_adapter``, weighted sum, TIES, DARE or side by side). Heads cannot be averaged when the
tasks have different labels, so each source keeps its own: the new run is a multi-task run
(docs/multitask.md) without task prefixes, whose labels are each source's labels in its namespace
("pang-lee-sentences/positive") and whose head is the sources' heads stacked row by row. Each example is
scored among its own task's labels only, which is exactly what its source's head alone would predict on
top of the combined encoder. The run evaluates itself on every source's own evaluation split (the same
rows its source held out: same data settings, same seed) and records the sources' numbers beside it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import Config, to_dict
from .configure import load_config
from .errors import ConfigError, RunError
from .fs import atomic_dir
from .inference import RunParts, damaged_hint, load_delta, on_device, read_run
from .metrics import TASK_SEPARATOR
from .models import count_parameters
from .registry_db import Recording
from .rundir import RunDir, new_run_dir
from .tasks import registry as tasks
from .train.checkpoint import LoopState
from .train.progress import phase
from .train.session import finish, tracked, write_inputs, write_metrics

WEIGHTS_FILE = "adapter_model.safetensors"
# A source's data settings that may differ: what makes it a task of its own (data/multitask.py's TASK_KEYS).
OWN_DATA = ("train", "eval", "test", "text_column", "label_column", "tasks", "task_prefix")


@dataclass
class Source:
    name: str          # its task's name in the combined run
    parts: RunParts

    @property
    def cfg(self) -> Config:
        return self.parts.cfg

    @property
    def labels(self) -> list[str]:
        return self.parts.task.labels


def merge_deltas(paths: list[str], how: str = "linear", weights: list[float] | None = None, density: float = 0.5,
                 rank: int | None = None, names: list[str] | None = None, output_dir: str | None = None,
                 seed: int = 0, progress: bool = True) -> RunDir:
    """One run from the completed runs at ``paths``: their deltas combined ``how``, their heads kept, its
    metrics measured on each source's own evaluation data."""
    sources = _sources(paths, names)
    weights = list(weights) if weights else [1.0] * len(sources)
    method = sources[0].parts.method
    problems = _problems(sources, how, weights, density, rank)
    if problems:
        raise ConfigError(problems)
    phase("merging", f"{len(sources)} {method.name} deltas ({how}) on {sources[0].cfg.model}", progress)
    torch.manual_seed(seed)  # DARE drops entries at random
    state, adapter = method.combine(sources[0].parts.build_base(), [s.parts.run.delta for s in sources], weights,
                                    how, density, rank)
    cfg = _config(sources, adapter, output_dir, how)
    task = tasks.get(cfg.task)(cfg, pad_id=sources[0].parts.tokenizer.pad_token_id)
    data = task.prepare(sources[0].parts.tokenizer)
    state.update(_stacked_heads(sources, task.labels))
    run = new_run_dir(cfg.output_dir, cfg.run_name)
    record = Recording(run.path, cfg, "merge")
    with tracked(run, record):
        write_inputs(run, cfg, sources[0].parts.tokenizer, data.report, data.rejects,
                     {s: len(getattr(data, s).rows) for s in ("train", "eval", "test")}, task.labels)
        _write_delta(run.delta, state, adapter, sources[0].parts.run.delta)
        phase("evaluation", f"{len(data.eval.examples):,} examples of {len(sources)} tasks", progress)
        model = on_device(load_delta(run, method, task.build_model(cfg.model), cfg, task, damaged_hint(run)))
        after = task.evaluate(model, data.eval.examples)
        with method.switched_off(model) as base:
            before = task.evaluate(base, data.eval.examples)
        run.write_json("baseline.json", before)
        trainable = sum(t.numel() for t in state.values())  # what the delta holds: loaded, nothing trains
        merged = {"how": how, "weights": weights, "rank": adapter["r"],
                  **({"density": density} if how in ("ties", "dare") else {}), "seed": seed,
                  "sources": [_source_record(s, w) for s, w in zip(sources, weights)]}
        write_metrics(run, task, after, before, trainable, count_parameters(model)[1], LoopState(), merged=merged)
        finish(run, record)
    return run


def _sources(paths: list[str], names: list[str] | None) -> list[Source]:
    if len(paths) < 2:
        raise ConfigError([f"merge-deltas: give at least two runs to combine, got {len(paths)}"])
    if names and len(names) != len(paths):
        raise ConfigError([f"--names: one name per run ({len(paths)}), got {len(names)}"])
    parts = [read_run(p) for p in paths]
    chosen = names or [_task_name(p.cfg) for p in parts]
    seen: dict[str, int] = {}
    unique = []
    for name in chosen:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    bad = [n for n in unique if not re.fullmatch(r"[A-Za-z0-9_-]+", n)]
    if bad:
        raise ConfigError([f"--names: {', '.join(map(repr, bad))}: a task name may use letters, digits, _ and - only"])
    return [Source(n, p) for n, p in zip(unique, parts)]


def _task_name(cfg: Config) -> str:
    """A source's task name: its training data's name (a packaged data set, or the file's stem)."""
    ref = cfg.data.train
    stem = ref if "/" not in ref and "." not in ref else Path(ref).stem
    return re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "task"


def _problems(sources: list[Source], how: str, weights: list[float], density: float, rank: int | None) -> list[str]:
    """Everything that stops these runs from combining, all at once."""
    first, method = sources[0], sources[0].parts.method
    out = []
    if how not in method.combinations:
        ways = ", ".join(method.combinations) or "none: it cannot combine deltas"
        out.append(f"--how: {how!r} is not a way {method.name} deltas combine; use {ways}")
    if len(weights) != len(sources):
        out.append(f"--weights: one weight per run ({len(sources)}), got {len(weights)}")
    if how in ("ties", "dare") and not 0.0 < density <= 1.0:
        out.append(f"--density: the share of each delta's entries kept, in (0, 1], got {density}")
    if rank is not None and (rank < 1 or how == "cat"):
        out.append(f"--rank: a rank of at least 1 for linear, ties or dare (cat's rank is the sum), got {rank}")
    for s in sources:
        where = str(s.parts.run.path)
        if s.parts.method.name != method.name:
            out.append(f"{where}: trained with {s.parts.method.name}, {first.parts.run.path} with {method.name}; "
                       "combine deltas of one method")
        elif s.cfg.model != first.cfg.model:
            out.append(f"{where}: base model {s.cfg.model}, not {first.cfg.model}; deltas combine on one base")
        if not (s.parts.task.multitask and s.parts.task.new_head):  # the combined run is a multi-task run
            out.append(f"{where}: a {s.cfg.task} run; merge-deltas combines classification runs (each keeps its "
                       "own head)")
        if s.cfg.data.tasks:
            out.append(f"{where}: already a multi-task run; combine single-task runs")
        out += [f"{where}: {p}" for p in s.parts.method.combine_problems(s.parts.run.delta)]
        out += [f"{where}: {p}" for p in _settings_differ(first.cfg, s.cfg)]
    return out


def _settings_differ(a: Config, b: Config) -> list[str]:
    """Settings that decide which rows are held out and how they are read must match: the combined run
    evaluates each task on the rows its own run held out."""
    da, db = dataclasses.asdict(a.data), dataclasses.asdict(b.data)
    keys = [f"data.{k}" for k in da if k not in OWN_DATA and da[k] != db[k]]
    keys += [f"train.{k}" for k in ("seed", "max_length") if getattr(a.train, k) != getattr(b.train, k)]
    return [f"{k} differs from the first run's; the tasks' evaluation rows would not be their own runs' (train "
            "the runs with the same data settings)" for k in keys]


def _config(sources: list[Source], adapter: dict, output_dir: str | None, how: str) -> Config:
    """The first run's config as a multi-task run over every source's data, without prefixes, whose
    method options describe the combined delta (its rank, alpha = rank: scale 1, its layers)."""
    first = sources[0].cfg
    tasks_spec = {}
    for s in sources:
        d = s.cfg.data
        tasks_spec[s.name] = {"train": d.train, "text_column": d.text_column, "label_column": d.label_column,
                              **({"eval": d.eval} if d.eval else {})}
    data = dataclasses.replace(first.data, train="", eval=None, test=None, tasks=tasks_spec, task_prefix=False)
    options = dataclasses.replace(first.method.options, r=adapter["r"], alpha=float(adapter["lora_alpha"]),
                                  use_rslora=False, target_modules=adapter["target_modules"], init="default")
    cfg = dataclasses.replace(first, data=data, method=dataclasses.replace(first.method, options=options),
                              output_dir=output_dir, name=f"merge-{how}-{'+'.join(s.name for s in sources)}")
    return load_config(to_dict(cfg), check_paths=False)  # validated as any config is


def _stacked_heads(sources: list[Source], labels: list[str]) -> dict[str, torch.Tensor]:
    """The sources' heads as one: for each label of the combined run ("task/label"), the row of its
    task's head for that label."""
    heads = [{k: v for k, v in load_file(s.parts.run.delta / WEIGHTS_FILE).items() if ".lora_" not in k}
             for s in sources]
    by_name = {s.name: (s, head) for s, head in zip(sources, heads)}
    out = {}
    for key in heads[0]:
        rows = []
        for label in labels:
            name, own = label.split(TASK_SEPARATOR, 1)
            source, head = by_name[name]
            tensor = head.get(key)
            if tensor is None or tensor.shape[0] != len(source.labels):
                raise RunError(f"{source.parts.run.delta}: head tensor {key} has no row per label "
                               f"({len(source.labels)} labels); merge-deltas stacks heads that are one linear "
                               "layer over the classes")
            rows.append(tensor[source.labels.index(own)])
        out[key] = torch.stack(rows).contiguous()
    return out


def _write_delta(folder: Path, state: dict, adapter: dict, like: Path) -> None:
    """The combined delta in peft's format: the first source's adapter config (task type, heads to save,
    base name) with the combined rank, scale and layers."""
    config = json.loads((like / "adapter_config.json").read_text())
    config.update({k: adapter[k] for k in ("r", "lora_alpha", "target_modules", "use_rslora")},
                  init_lora_weights=True, inference_mode=True, rank_pattern={}, alpha_pattern={})

    def build(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    atomic_dir(folder, build)


def _source_record(source: Source, weight: float) -> dict:
    """What the combined run says of a source: where it is, its weight and its own evaluation."""
    metrics = source.parts.run.read_json("metrics.json")
    name = metrics.get("main_metric", {}).get("name", "accuracy")
    return {"task": source.name, "run": str(source.parts.run.path), "weight": weight,
            "main_metric": name, "alone": metrics.get("eval", {}).get(name),
            "macro_f1_alone": metrics.get("eval", {}).get("macro_f1")}
