"""The New run page's form, generated from the config dataclasses (``config.Config`` and each method's
``Options``): one field per config key, its ``doc`` as the help text, its default filled in. What a posted
form means is a list of ``key=value`` overrides, exactly what `deltatune train` takes on its command line
(only the fields that differ from their defaults, plus the ones that name the run); the problems
``configure.load_config`` reports go back next to the fields they name, word for word."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from ..config import Config, parse_overrides
from ..errors import ConfigError
from ..methods import registry as methods
from .layout import esc

# Keys the form does not offer: they name files, folders or code outside the data root (a form field never
# becomes such a path), or are written by deltatune itself. A YAML config in a terminal sets them.
NOT_IN_FORM = ("output_dir", "train.lr_source", "data.tasks", "ppo.reward_model", "ppo.reward_fn", "grpo.rewards",
               "data.augment.paraphrase_model")
ALWAYS = ("model", "task", "method.name", "data.train")  # in the overrides even at their defaults
FROM_COMMAND_LINE = " (set on the command line)"  # load_config's note; in the studio the form set everything
LABELS = {"model": "Base model", "name": "Run name", "method.name": "Method", "data.train": "Training data",
          "data.eval": "Evaluation data", "data.test": "Test data", "train.lr": "Learning rate", "train.eval_every": "Evaluate every",
          "method.r": "Rank r",
          "train.grad_accum": "Gradient accumulation", "data.pii.types": "PII kinds", "eval.icl_shots": "ICL shots",
          "method.use_dora": "DoRA", "method.use_rslora": "rsLoRA", "method.loraplus_lr_ratio": "LoRA+ rate ratio",
          "method.init": "Initialisation", "method.init_r": "Initial rank r", "method.target_r": "Target rank r",
          "data.kfold": "K folds", "train.bf16": "bf16 mixed precision", "train.report_to": "Report to"}
UNITS = {"train.epochs": "passes", "train.max_steps": "steps", "train.batch_size": "examples",
         "train.eval_batch_size": "examples", "train.max_length": "tokens", "train.eval_every": "steps",
         "train.save_every": "steps", "train.grad_accum": "passes per step", "data.train_limit": "rows",
         "data.eval_limit": "rows", "data.shots_per_class": "rows per class", "data.clean.min_chars": "characters",
         "data.clean.max_chars": "characters", "data.eval_fraction": "share, 0 to 1",
         "data.test_fraction": "share, 0 to 1", "train.warmup_ratio": "share, 0 to 1",
         "eval.forgetting_rows": "sentences", "eval.icl_limit": "rows", "ppo.max_new_tokens": "tokens",
         "grpo.max_new_tokens": "tokens", "data.augment.eda": "rows per row",
         "data.augment.paraphrase": "rows per row"}


@dataclass(frozen=True)
class Field:
    key: str      # the config key: train.lr, method.r
    name: str     # the form field's name: the key, or m.<method>.<option> for a method's option
    kind: Any     # its type annotation
    default: Any
    help: str

    @property
    def ident(self) -> str:
        return ident(self.name)

    @property
    def label(self) -> str:
        return LABELS.get(self.key) or self.key.rsplit(".", 1)[-1].replace("_", " ").capitalize()


def ident(name: str) -> str:
    """The HTML id of the field named ``name``."""
    return "f-" + name.replace(".", "-").replace("_", "-")


def walk(cls: type, prefix: str = "", name_prefix: str | None = None) -> list[Field]:
    """Every key of dataclass ``cls`` (sections walked into), as ``config.describe`` walks them."""
    hints = typing.get_type_hints(cls)
    out: list[Field] = []
    for f in dataclasses.fields(cls):
        if f.name == "options":
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out += walk(hints[f.name], f"{prefix}{f.name}.", None if name_prefix is None else f"{name_prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Field(f"{prefix}{f.name}", f"{name_prefix if name_prefix is not None else prefix}{f.name}",
                         hints[f.name], default, f.metadata.get("help", "")))
    return out


def config_fields() -> list[Field]:
    return [f for f in walk(Config) if f.key not in NOT_IN_FORM]


def method_fields(method: str) -> list[Field]:
    """The chosen method's options, named per method so that every method's fieldset can be on the page."""
    return walk(methods.get(method).Options, "method.", f"m.{method}.")


def show(value: Any) -> str:
    """A value as the form shows it, and as an override's value reads it back (YAML)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip() if value else ""
    return str(value)


def overrides(form: dict[str, str], fields: list[Field], refs: dict[str, str]) -> list[tuple[Field, str]]:
    """(field, ``key=value``) for each field that differs from its default (and the ``ALWAYS`` ones);
    ``refs``: the config value of a chosen model or data file (a packaged name or a path under the root)."""
    out = []
    for f in fields:
        raw = form.get(f.name)
        if raw is None:
            continue
        raw = refs.get(f.key, raw.strip())
        if f.key in ALWAYS or raw != show(f.default):
            out.append((f, f"{f.key}={raw}"))
    return out


def problems_of(pairs: list[tuple[Field, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """The overrides that are not even YAML (each with its own message, keyed by its field's name), and
    every problem ``load_config`` finds in the rest, at once: ``(good overrides, [(name or "", message)])``."""
    good, found = [], []
    for f, item in pairs:
        try:
            parse_overrides([item])
            good.append(item)
        except ConfigError as exc:
            found += [(f.name, p) for p in exc.problems]
    return good, found


def place(problems: list[str], fields: list[Field], method: str) -> list[tuple[str, str]]:
    """Each ``key: message`` of ``load_config`` with the form field it names ("" when it names none)."""
    names = {f.key: f.name for f in fields}
    out = []
    for problem in problems:
        problem = problem.replace(FROM_COMMAND_LINE, "")
        keys = [k.strip() for k in problem.partition(": ")[0].split(" / ")]
        named = [names.get(k) or (f"m.{method}.{k[7:]}" if k.startswith("method.") else "") for k in keys]
        out.append((next((n for n in named if n), ""), problem))
    return out


def control(f: Field, value: str, invalid: bool, choices: list[tuple[str, str]] | None = None) -> str:
    """The input (or select) of one field."""
    described = f'aria-describedby="{f.ident}-help{f" {f.ident}-error" if invalid else ""}"'
    attrs = f'id="{f.ident}" name="{esc(f.name)}" {described}{" aria-invalid=true" if invalid else ""}'
    if choices is None and f.kind is bool:
        choices = [("true", "yes (true)"), ("false", "no (false)")]
    if choices is not None:
        if value not in (v for v, _ in choices):
            choices = [(value, value)] + choices  # a value typed elsewhere: kept, and checked like any other
        options = "".join(f'<option value="{esc(v)}"{" selected" if v == value else ""}>{esc(t)}</option>'
                          for v, t in choices)
        return f"<select {attrs}>{options}</select>"
    mode = ' inputmode="numeric"' if f.kind in (int, int | None) else ""
    hint = ' placeholder="the method\'s default"' if f.key == "train.lr" else (
        ' placeholder="unset"' if f.default is None else "")
    return f'<input type="text" {attrs} value="{esc(value)}"{mode}{hint} autocomplete="off" spellcheck="false">'


def field_html(f: Field, value: str, errors: list[str], choices: list[tuple[str, str]] | None = None) -> str:
    """One field: its label and key, the control with its unit, the problems with it, its documentation."""
    unit = f'<span class="nr-unit">{esc(UNITS[f.key])}</span>' if f.key in UNITS else ""
    shown = "".join(f"<span>{esc(e)}</span>" for e in errors)
    error = f'<p class="nr-error" id="{f.ident}-error">{shown}</p>' if errors else ""
    return (f'<div class="nr-field{" nr-invalid" if errors else ""}"><label for="{f.ident}">{esc(f.label)} '
            f'<code class="key">{esc(f.key)}</code></label><div class="nr-control">'
            f'{control(f, value, bool(errors), choices)}{unit}</div>{error}'
            f'<p class="nr-help" id="{f.ident}-help">{esc(f.help)}</p></div>')


def grid(fields: list[Field], values: dict[str, str], errors: dict[str, list[str]],
         choices: dict[str, list[tuple[str, str]]]) -> str:
    return '<div class="nr-grid">' + "".join(
        field_html(f, values.get(f.name, show(f.default)), errors.get(f.name, []), choices.get(f.key))
        for f in fields) + "</div>"


def when(name: str, value: str, chosen: str) -> str:
    """Attributes of a part shown only while the select ``name`` has ``value`` (studio.js switches it)."""
    return f'data-when="{esc(name)}" data-when-value="{esc(value)}"{"" if value == chosen else " hidden"}'
