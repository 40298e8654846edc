"""Load a config and check it against everything it names: methods, tasks, packaged assets, files.

config.py parses a config and checks each section on its own; it sits below every layer, so it
cannot ask the method registry which options a method takes, nor assets whether a model exists.
This module sits above tasks and methods and asks them. ``load_config`` is what commands call: it
reports every problem of both kinds at once, in one ConfigError.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import assets
from .components import supports, tasks_of
from .config import LARGE_LR, Config, MethodConfig, build_section, describe, did_you_mean, parse_config
from .data.multitask import check_tasks
from .errors import ConfigError
from .fs import user_path
from .methods import registry
from .tasks import registry as tasks

def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> Config:
    """Read, merge and validate a config (a file, or one in memory as ``config.to_dict`` gives it). Raises
    ConfigError listing every problem."""
    parsed = parse_config(path, overrides)
    cfg, problems = parsed.cfg, parsed.problems
    cfg.method = _build_method(parsed.method, problems)
    problems += task_problems(cfg) + reference_problems(cfg, check_paths)
    if cfg.method.options is not None and hasattr(cfg.method.options, "problems"):
        problems += [f"method.{p}" for p in cfg.method.options.problems()]
    if problems:
        raise ConfigError(_with_origin(problems, overrides), source=parsed.source)
    resolve_lr(cfg)
    for warning in config_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    return cfg


def _with_origin(problems: list[str], overrides: list[str] | None) -> list[str]:
    """A ``key: problem`` whose value came from the command line says so (the message's heading names
    the config file, which did not set it)."""
    given = {o.partition("=")[0].strip() for o in overrides or ()}
    out = []
    for problem in problems:
        key, sep, _ = problem.partition(": ")
        out.append(f"{problem} (set on the command line)" if sep and key in given else problem)
    return out


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are valid but probably a mistake (the run goes ahead)."""
    method = registry.get(cfg.method.name)
    if cfg.train.lr_source.startswith(NOT_SEARCHED):
        return [f"train.lr: {cfg.train.lr_source}"]
    if isinstance(cfg.train.lr, float) and cfg.train.lr >= LARGE_LR and not method.prepends_virtual_tokens:
        return [f"train.lr: {cfg.train.lr:g} is unusually large for {method.name} (only soft prompts are trained "
                "with rates near 1); the loss will likely diverge. Typical: 1e-5 to 1e-4 for full fine-tuning, "
                "1e-4 to 1e-3 for LoRA and adapters"]
    return []


AUTO = "auto: the learning-rate range test's pick (lr_find.json in the run)"
NOT_SEARCHED = "auto, not searched"


def resolve_lr(cfg: Config) -> None:
    """Settle ``train.lr`` once, and say where it came from (``train.lr_source``): unset means the
    method's default (``Method.default_lr``); ``auto`` stays until the run's range test replaces it
    (train/lr_find.py), except for a method that fits its delta directly, which has no rate to search.
    A number read back from a run's config.yaml keeps that run's source (auto, or the default while it
    still is the method's default); any other number is the config's."""
    method, t = registry.get(cfg.method.name), cfg.train
    default = f"default of {method.name}: {method.default_lr:g} ({method.default_lr_source})"
    if method.fits_directly(cfg.method.options) and (t.lr is None or t.lr == "auto"):
        t.lr, t.lr_source = method.default_lr, (f"{NOT_SEARCHED if t.lr == 'auto' else 'not used'}: {method.name} "
                                               "with these options fits its delta directly, without a learning rate")
    elif t.lr is None:
        t.lr, t.lr_source = method.default_lr, default
    elif t.lr == "auto":
        t.lr_source = AUTO
    elif t.lr_source not in (AUTO, default) or (t.lr_source == default and t.lr != method.default_lr):
        t.lr_source = "config"


def _build_method(raw: dict | None, problems: list[str]) -> MethodConfig:
    """The method section as written -> its name and its own Options dataclass (from the registry)."""
    if raw is None:  # malformed: config.parse_config has said so
        return MethodConfig()
    raw = dict(raw)
    name = raw.pop("name", MethodConfig.name)
    known = registry.names()
    if name not in known:
        problems.append(f"method.name: unknown method {name!r}{did_you_mean(str(name), known)}; "
                        f"available: {', '.join(known)}")
        return MethodConfig(name=str(name))
    options = build_section(registry.get(name).Options, raw, "method.", problems)
    return MethodConfig(name=name, options=options)


def task_problems(cfg: Config) -> list[str]:
    """The task's own checks of the settings it reads (``Task.problems``), and whether the method
    can train it (``Method.accepts`` / ``Task.accepts``)."""
    known = tasks.names()
    if cfg.task not in known:
        return [f"task: unknown task {cfg.task!r}{did_you_mean(cfg.task, known)}; available: {', '.join(known)}"]
    task = tasks.get(cfg.task)
    problems = task.problems(cfg)
    if cfg.train.lr == "auto" and task.loop != "examples":
        problems.append(f"train.lr: auto runs its range test on the loop over fixed examples, and task {cfg.task} "
                        "samples its own data; give a number, or leave train.lr unset for the method's default")
    if cfg.method.name in registry.names():
        why = supports(registry.get(cfg.method.name), task)
        if why:
            problems.append(f"method.name: {cfg.method.name} does not support task {cfg.task!r}: {why} "
                            f"(it supports: {', '.join(tasks_of(registry.get(cfg.method.name)))})")
    return problems


def reference_problems(cfg: Config, check_paths: bool) -> list[str]:
    """The model and data the config names: packaged aliases, or (if ``check_paths``) existing files."""
    problems = assets.check_model_ref(cfg.model, check_paths)
    for key in ("train", "eval", "test"):
        ref = getattr(cfg.data, key)
        if ref and user_path(ref).is_dir():
            problems += _check_data_folder(user_path(ref), f"data.{key}")
        elif ref:
            problems += assets.check_data_ref(ref, f"data.{key}", check_paths)
    return problems + check_tasks(cfg.data, check_paths)


def _check_data_folder(path: Path, key: str) -> list[str]:
    markers = ("data_report.json", "state.json", "dataset_dict.json")  # prepared / saved datasets folders
    if any((path / m).is_file() for m in markers):
        return []
    return [f"{key}: {path} is a folder but neither one written by `deltatune data prepare` nor a saved "
            "`datasets` folder; point it at a data file or such a folder"]


def explain() -> str:
    """Every config key with its default and documentation (printed by `validate --explain`)."""
    lines = describe(Config)
    for name in registry.names():  # what an unset train.lr becomes
        method = registry.get(name)
        lines.append(f"train.lr  (unset, method.name={name}) = {method.default_lr:g}\n    {method.default_lr_source}")
    for name in registry.names():
        lines += describe(registry.get(name).Options, "method.", f"  (method.name={name})")
    return "\n".join(lines)
