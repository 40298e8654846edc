"""What PPO maximises: a score per (prompt, response), from exactly one of three sources.

- ``ppo.reward_model`` = a finished ``task: classification`` run + ``ppo.reward_label``: the
  label's log-odds  ``z_label - logsumexp_{j != label} z_j  = log p / (1 - p)``  of the text
  ``prompt + " " + response``. Log-odds rather than p: it does not saturate at 0 and 1, so a
  response that is already very positive still gets a gradient toward more.
- ``ppo.reward_model`` = a finished ``task: reward`` run: its scalar score
  (``inference.score(loaded, prompts, responses)``).
- ``ppo.reward_fn`` = ``'module:function'`` or ``'path/to/file.py:function'``: a Python callable
  ``(prompts, responses) -> list of floats``.

Every check here names the config key, so ``load_reward`` can run before a run directory exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import inference
from ..config import Config
from ..errors import ConfigError, DataError, DeltatuneError
from ..rundir import RunDir

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


def load_reward(cfg: Config) -> RewardFn:
    """The configured reward as ``(prompts, responses) -> (batch,) float tensor``. Raises ConfigError."""
    p = cfg.ppo
    problems = p.source_problems()
    if problems:
        raise ConfigError(problems)
    if p.reward_fn:
        return checked("ppo.reward_fn", import_callable(p.reward_fn))
    return checked("ppo.reward_model", _model_reward(p.reward_model, p.reward_label, cfg.train.eval_batch_size))


def checked(key: str, fn: Callable) -> RewardFn:
    """Call ``fn`` and insist on one finite number per response, naming ``key`` when it does not."""
    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        try:
            values = fn(prompts, responses)
            scores = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
        except DeltatuneError:
            raise
        except Exception as exc:
            raise DeltatuneError(f"{key}: the reward failed on {len(prompts)} responses: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if scores.shape != (len(responses),):
            raise DeltatuneError(f"{key}: returned {scores.numel()} values for {len(responses)} responses; "
                                 "it must return one number per response")
        if not torch.isfinite(scores).all():
            raise DeltatuneError(f"{key}: returned a non-finite reward ({scores.tolist()}); rewards must be numbers")
        return scores
    return reward


def import_callable(ref: str) -> Callable:
    """``'package.module:function'`` or ``'path/to/file.py:function'`` -> the function."""
    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name:
        raise ConfigError([f"ppo.reward_fn: {ref!r} is not of the form 'module:function' or 'file.py:function'"])
    try:
        if where.endswith(".py"):
            module = _module_from_file(Path(where).expanduser())
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise ConfigError([f"ppo.reward_fn: cannot import {where!r}: {type(exc).__name__}: {exc}"]) from exc
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError([f"ppo.reward_fn: {where} has no {name!r} (its functions: {', '.join(public) or 'none'})"])
    if not callable(fn):
        raise ConfigError([f"ppo.reward_fn: {where}:{name} is not a function but a value of type {type(fn).__name__}"])
    return fn


def _module_from_file(path: Path):
    if not path.is_file():
        raise ConfigError([f"ppo.reward_fn: file {path} does not exist"])
    name = f"deltatune_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- reward models

def _model_reward(path: str, label: str | None, batch_size: int) -> Callable:
    run = RunDir(Path(path).expanduser())
    try:
        run.require_complete()
    except DeltatuneError as exc:
        raise ConfigError([f"ppo.reward_model: {exc}"]) from exc
    loaded = inference.load_run(run.path)
    task = loaded.cfg.task
    if loaded.task.one_label_per_text:
        return classifier_reward(loaded, label, batch_size)
    if label:
        raise ConfigError([f"ppo.reward_label: {run.path} is a task {task!r} run, not a classifier; "
                           "a label only applies to a classification reward model, unset it"])
    if loaded.task.scores_responses:
        return lambda prompts, responses: inference.score(loaded, prompts, responses)
    raise ConfigError([f"ppo.reward_model: {run.path} is a task {task!r} run; a reward model must be a "
                       "task classification or task reward run"])


def classifier_reward(loaded, label: str | None, batch_size: int) -> Callable:
    """Log-odds of ``label`` under a classification run, of ``prompt + " " + response``."""
    if not label or label not in loaded.labels:
        what = f"{label!r} is not one of its labels" if label else "ppo.reward_label is not set"
        raise ConfigError([f"ppo.reward_label: {loaded.run.path} is a classifier; {what}. Choose one of: "
                           f"{', '.join(loaded.labels)}"])
    index = loaded.labels.index(label)
    tok, max_length = loaded.tokenizer, loaded.cfg.train.max_length

    @torch.no_grad()
    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        texts = [f"{p} {r}".strip() for p, r in zip(prompts, responses)]
        out = []
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt").to(loaded.device)
            logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            out += log_odds(logits, index).tolist()
        return out

    return reward


def log_odds(logits: torch.Tensor, index: int) -> torch.Tensor:
    """``z_i - logsumexp_{j != i} z_j`` per row: log p_i / (1 - p_i) under softmax(z)."""
    others = logits.clone()
    others[:, index] = -math.inf
    return logits[:, index] - others.logsumexp(-1)



# ----------------------------------------------------------------------------- GRPO: weighted sources

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (``-12``, ``3.5``, ``1,024``), or None."""
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def arithmetic(prompts: list[str], responses: list[str], answer: list) -> list[float]:
    """1 where the response's last number equals the prompt row's ``answer``, else 0 (no number: 0)."""
    return [float(last_number(r) == float(a)) for r, a in zip(responses, answer)]


def format_reward(pattern: str) -> Callable:
    """1 where ``re.search(pattern, response)`` finds a match, else 0 (anchor with ^ and $ for a whole match)."""
    compiled = re.compile(pattern)

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(compiled.search(r) is not None) for r in responses]

    return reward


@dataclass
class Source:
    """One entry of grpo.rewards, loaded: its config key, its name in the logs, its weight, its function, and
    the prompt rows' columns the function reads (its parameters after prompts and responses, passed by name
    as lists; None: it takes ``**kwargs`` and gets every column). ``numbers``: columns that must hold numbers."""
    key: str
    name: str
    weight: float
    fn: Callable
    columns: tuple[str, ...] | None = ()
    numbers: tuple[str, ...] = ()

    def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]) -> torch.Tensor:
        """One score per response (``rows``: the prompt rows, one per response)."""
        names = self.columns
        if names is None:  # **kwargs: every column but the pipeline's own (_row, _file) and the two arguments
            names = [c for c in (rows[0] if rows else {})
                     if not c.startswith("_") and c not in ("prompts", "responses")]
        extra = {c: [row.get(c) for row in rows] for c in names}
        return checked(self.key, lambda p, r: self.fn(p, r, **extra))(prompts, responses)

    def check_rows(self, rows: list[dict]) -> None:
        """A DataError naming the file and row of the first prompt row that lacks a column this source reads."""
        for row in rows:
            for column in self.columns or ():
                value = row.get(column)
                if value is None or (column in self.numbers and not _is_number(value)):
                    what = "has no value in column" if value is None else f"has {value!r}, not a number, in column"
                    raise DataError(f"{row.get('_file', 'data')}: row {row.get('_row', '?')} {what} {column!r}, "
                                    f"which {self.key} ({self.name}) reads; fix the row or drop it")


def load_sources(cfg: Config) -> list[Source]:
    """grpo.rewards, each loaded and checked (modules imported, runs read). Raises ConfigError naming the entry."""
    problems = cfg.grpo.reward_problems()
    if problems:
        raise ConfigError(problems)
    sources, names = [], set()
    for i, entry in enumerate(cfg.grpo.rewards):
        key = f"grpo.rewards[{i}]"
        with _renamed({"ppo.reward_fn": f"{key}.function", "ppo.reward_model": f"{key}.run",
                       "ppo.reward_label": f"{key}.label"}):
            fn, name = _source(entry, cfg.train.eval_batch_size)
        while name in names:  # two entries of one function: tell them apart in the logs
            name += "'"
        names.add(name)
        numbers = ("answer",) if fn is arithmetic else ()
        sources.append(Source(key, name, float(entry.get("weight", 1)), fn, _columns(fn), numbers))
    return sources


def _source(entry: dict, batch_size: int) -> tuple[Callable, str]:
    function = entry.get("function")
    if function == "arithmetic":
        return arithmetic, function
    if function == "format":
        return format_reward(entry["pattern"]), function
    if function:
        return import_callable(function), function.rpartition(":")[2]
    return _model_reward(entry["run"], entry.get("label"), batch_size), Path(entry["run"]).name


def _columns(fn: Callable) -> tuple[str, ...] | None:
    """The row columns ``fn`` reads: its parameters after (prompts, responses); None if it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): (prompts, responses) only
        return ()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return tuple(p.name for p in named[2:] if p.default is p.empty)


def _is_number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


@contextmanager
def _renamed(keys: dict[str, str]):
    """PPO's loaders name ppo.* keys in their errors; for a GRPO entry, name that entry's keys instead."""
    try:
        yield
    except ConfigError as exc:
        problems = []
        for problem in exc.problems:
            for old, new in keys.items():
                problem = problem.replace(old, new)
            problems.append(problem)
        raise ConfigError(problems) from exc
