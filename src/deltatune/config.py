"""Typed configuration: the single source of truth for a run.

A config is YAML plus dotted ``key=value`` overrides. It is validated once, here, and every
problem is reported at once (unknown keys with a "did you mean", wrong types, bad values).
Each field's ``help`` metadata is its documentation (`deltatune validate --explain` prints it).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

TASKS = ("classification", "causal_lm", "token_classification", "seq2seq")


def doc(default: Any, help: str) -> Any:
    """A dataclass field with documentation (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    train: str = doc("", "Training data: a .csv/.tsv/.json/.jsonl/.parquet file, or a packaged alias "
                         "(pang-lee-sentences, chatterbot).")
    eval: str | None = doc(None, "Evaluation data (same formats). If unset, eval_fraction of train is held out.")
    eval_fraction: float = doc(0.2, "Share of train held out for evaluation when data.eval is unset.")
    text_column: str = doc("text", "Column with the input text (classification; plain-text causal LM).")
    label_column: str = doc("label", "Column with the class label (classification).")
    prompt_column: str = doc("prompt", "Column with the prompt (causal-LM SFT; the source text for seq2seq).")
    response_column: str = doc("response", "Column with the response the model learns (causal-LM SFT; "
                                            "the target text for seq2seq).")
    tokens_column: str = doc("tokens", "Column with the words of a sentence (token classification): a list, "
                                       "or a string split on spaces.")
    tags_column: str = doc("tags", "Column with one tag per word (token classification), same form as tokens.")
    train_limit: int | None = doc(None, "Use at most this many training rows (after the split), for quick runs.")
    eval_limit: int | None = doc(None, "Use at most this many evaluation rows.")
    chat_template: bool = doc(True, "Format prompt/response pairs with the tokenizer's chat template if it has one.")


@dataclass
class TrainConfig:
    epochs: int = doc(1, "Passes over the training data (max_steps wins if set).")
    max_steps: int = doc(0, "Stop after this many optimizer steps; 0 means epochs decide.")
    lr: float = doc(5e-5, "Peak learning rate of AdamW.")
    batch_size: int = doc(16, "Examples per forward pass.")
    grad_accum: int = doc(1, "Forward passes per optimizer step (effective batch = batch_size * grad_accum).")
    warmup_ratio: float = doc(0.06, "Share of optimizer steps spent warming the learning rate up linearly.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    max_length: int = doc(128, "Truncate tokenized examples to this many tokens.")
    seed: int = doc(42, "Seed for data order, initialisation and dropout.")
    eval_every: int = doc(0, "Evaluate every N optimizer steps; 0 means at the end of each epoch.")
    save_every: int = doc(0, "Write a resumable checkpoint every N optimizer steps; 0 means at every evaluation.")
    eval_batch_size: int = doc(64, "Examples per forward pass during evaluation.")
    progress: bool = doc(True, "Show a progress bar with loss, tokens/s and ETA.")


@dataclass
class MethodConfig:
    name: str = doc("lora", "Adaptation method (see `deltatune methods`).")
    options: Any = None  # the method's own Options dataclass, filled in by load_config


@dataclass
class Config:
    model: str = doc("minilm", "Base model: a local Hugging Face folder, or a packaged alias (minilm, smollm2-135m).")
    task: str = doc("classification", f"What to train: one of {', '.join(TASKS)}.")
    name: str | None = doc(None, "Run name; defaults to <model>-<task>-<method>.")
    output_dir: str | None = doc(None, "Run directory; defaults to runs/<name>-<timestamp>.")
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_name(self) -> str:
        model = Path(self.model).name if "/" in self.model else self.model
        return self.name or f"{model}-{self.task}-{self.method.name}"


# ----------------------------------------------------------------------------- parsing

def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.lr=1e-4", "method.r=16"]`` into a nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)"],
                              source="command line")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else None
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r} sets a key below {part!r}, which is a value"],
                                  source="command line")
        node[leaf] = value
    return tree


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"], source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of keys (model:, task:, method:, ...)"],
                          source=str(path))
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> Config:
    """Read, merge and validate a config. Raises ConfigError listing every problem."""
    raw = read_yaml(path) if path else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    source = str(path) if path else "command line"
    problems: list[str] = []
    method_raw = raw.pop("method", {}) or {}
    cfg = _build(Config, raw, "", problems)
    cfg.method = _build_method(method_raw, problems)
    problems += _check_values(cfg, check_paths)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _build_method(raw: Any, problems: list[str]) -> MethodConfig:
    from .methods import registry

    if isinstance(raw, str):  # `method: lora` shorthand
        raw = {"name": raw}
    if not isinstance(raw, dict):
        problems.append(f"method: expected a mapping (method: {{name: lora, r: 8}}), got {raw!r}")
        return MethodConfig()
    raw = dict(raw)
    name = raw.pop("name", MethodConfig.name)
    known = registry.names()
    if name not in known:
        problems.append(f"method.name: unknown method {name!r}{_did_you_mean(str(name), known)}; "
                        f"available: {', '.join(known)}")
        return MethodConfig(name=str(name))
    options = _build(registry.get(name).Options, raw, "method.", problems)
    return MethodConfig(name=name, options=options)


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, appending (not raising) every problem."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key{_did_you_mean(str(key), list(fields))}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}.", problems)
            continue
        try:
            values[key] = coerce(value, kind)
        except (TypeError, ValueError) as exc:
            problems.append(f"{prefix}{key}: {exc}")
    return cls(**values)


def coerce(value: Any, kind: Any) -> Any:
    """Check ``value`` against a type annotation, converting where the intent is unambiguous."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(errors[0])
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(v, item) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected text, got {value!r}")
    if isinstance(kind, type) and isinstance(value, kind):
        return value
    raise ValueError(f"expected {kind}, got {value!r}")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- semantic checks

def _check_values(cfg: Config, check_paths: bool) -> list[str]:
    from . import assets
    from .methods import registry

    problems = []
    if cfg.task not in TASKS:
        problems.append(f"task: unknown task {cfg.task!r}{_did_you_mean(cfg.task, list(TASKS))}; "
                        f"available: {', '.join(TASKS)}")
    elif cfg.method.name in registry.names():
        tasks = registry.get(cfg.method.name).tasks
        if cfg.task not in tasks:
            problems.append(f"method.name: {cfg.method.name} does not support task {cfg.task!r} "
                            f"(it supports: {', '.join(tasks)})")
    problems += assets.check_model_ref(cfg.model, check_paths)
    if not cfg.data.train:
        problems.append("data.train: required (a data file or a packaged alias such as pang-lee-sentences)")
    for key in ("train", "eval"):
        ref = getattr(cfg.data, key)
        if ref:
            problems += assets.check_data_ref(ref, f"data.{key}", check_paths)
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: must be between 0 and 1, got {cfg.data.eval_fraction}")
    t = cfg.train
    positive = {"train.lr": t.lr, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "train.max_length": t.max_length, "train.epochs": t.epochs,
                "train.eval_batch_size": t.eval_batch_size}
    problems += [f"{k}: must be greater than 0, got {v}" for k, v in positive.items() if v <= 0]
    non_negative = {"train.max_steps": t.max_steps, "train.weight_decay": t.weight_decay,
                    "train.max_grad_norm": t.max_grad_norm, "train.eval_every": t.eval_every,
                    "train.save_every": t.save_every}
    problems += [f"{k}: must be 0 or more, got {v}" for k, v in non_negative.items() if v < 0]
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    for key in ("train_limit", "eval_limit"):
        value = getattr(cfg.data, key)
        if value is not None and value < 1:
            problems.append(f"data.{key}: must be at least 1, got {value}")
    if cfg.method.options is not None and hasattr(cfg.method.options, "problems"):
        problems += [f"method.{p}" for p in cfg.method.options.problems()]
    return problems


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what config.yaml in a run directory holds)."""
    out = dataclasses.asdict(dataclasses.replace(cfg, method=MethodConfig(cfg.method.name)))
    options = dataclasses.asdict(cfg.method.options) if cfg.method.options is not None else {}
    out["method"] = {"name": cfg.method.name, **options}
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def explain() -> str:
    """Every config key with its default and documentation (printed by `validate --explain`)."""
    from .methods import registry

    lines = []

    def walk(cls: type, prefix: str, note: str = "") -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "options":
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name}{note} = {default!r}\n    {f.metadata.get('help', '')}")

    walk(Config, "")
    for name in registry.names():
        walk(registry.get(name).Options, "method.", f"  (method.name={name})")
    return "\n".join(lines)
