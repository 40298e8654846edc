"""Optuna studies whose trials are training runs: what `deltatune tune` (hpo.py) and `deltatune compare`'s
learning-rate searches share.

Each trial is an ordinary run (``<study folder>/trial-NNNN``) built from the base config, the fixed
overrides and the trial's own ``key=value`` overrides (``suggest``); a single-objective study reports the
best evaluation score after every step and prunes by the median rule. The storage survives a killed
worker: a heartbeat fails the trials it left running, and the study goes on to its number of trials.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..configure import load_config
from ..errors import Stopped
from ..fs import is_temporary
from .progress import phase


@dataclass
class Study:
    name: str
    folder: Path
    storage: str
    objectives: list[tuple[str, str]]  # (metric, "maximize" | "minimize")
    trials: int


def suggest(trial, space: dict, method: str) -> list[str]:
    """The trial's overrides. ``method.name`` is drawn first; options of other methods are skipped."""
    overrides = []
    if "method.name" in space:
        method = trial.suggest_categorical("method.name", space["method.name"])
        overrides.append(f"method.name={method}")
    for key, choice in space.items():
        scope, _, option = key.partition(".")
        if key == "method.name" or (scope not in ("train", "data", "method") and scope != method):
            continue
        target = key if scope in ("train", "data", "method") else f"method.{option}"
        overrides.append(f"{target}={_draw(trial, key, choice)}")
    return overrides


def _draw(trial, key: str, choice):
    if isinstance(choice, list):
        return trial.suggest_categorical(key, choice)
    low, high = choice["low"], choice["high"]
    if isinstance(low, int) and isinstance(high, int) and not choice.get("log"):
        return trial.suggest_int(key, low, high)
    return trial.suggest_float(key, float(low), float(high), log=bool(choice.get("log")))


def _metric(metrics: dict, name: str) -> float:
    return float(metrics[name] if name in metrics else metrics["eval"][name])


def objective_for(study: Study, base: str | None, overrides: list[str], space: dict):
    import optuna

    from .run import train

    method = load_config(base, overrides).method.name

    def objective(trial):
        trial_overrides = suggest(trial, space, method)
        out = study.folder / f"trial-{trial.number:04d}"
        cfg = load_config(base, [*overrides, *trial_overrides, f"output_dir={out}", "train.progress=false"])
        trial.set_user_attr("overrides", trial_overrides)
        trial.set_user_attr("run_dir", str(out))
        callbacks = (_pruning_callback(trial, study.objectives[0][1]),) if len(study.objectives) == 1 else ()
        try:
            run = train(cfg, callbacks=callbacks, kind="trial")
        except Stopped as exc:  # the run directory and the registry say "pruned"
            raise optuna.TrialPruned(str(exc)) from exc
        metrics = run.read_json("metrics.json")
        values = [_metric(metrics, name) for name, _ in study.objectives]
        return values[0] if len(values) == 1 else values

    return objective


def _pruning_callback(trial, direction: str = "maximize"):
    """Report the best evaluation score so far after every step, in the study's ``direction``; prune when the
    pruner says so. The loop's score is higher-is-better (``Metric.score``: perplexity -> -perplexity); a
    minimizing study reads intermediate values as lower-is-better, so it gets the score negated (reported as
    it was, its pruner kept the worst trials and stopped the best)."""
    def callback(state):
        if state.best is None:
            return
        trial.report(state.best if direction == "maximize" else -state.best, state.step)
        if trial.should_prune():
            raise Stopped(f"pruned at step {state.step} (best score {state.best:.4f})", status="pruned")
    return callback


def open_study(study: Study, seed: int, prune_after: int = 3):
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    storage = study.storage
    if storage.startswith("sqlite") or storage.startswith("postgresql") or storage.startswith("mysql"):
        # A heartbeat lets a resumed study fail the trials a killed worker left running.
        storage = optuna.storages.RDBStorage(storage, heartbeat_interval=10, grace_period=30,
                                             engine_kwargs={"connect_args": {"timeout": 60}}
                                             if study.storage.startswith("sqlite") else {})
    directions = [d for _, d in study.objectives]
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=prune_after) if len(directions) == 1 else \
        optuna.pruners.NopPruner()
    return optuna.create_study(study_name=study.name, storage=storage, directions=directions, sampler=sampler,
                               pruner=pruner, load_if_exists=True)


def optimize(study: Study, base, overrides, space, seed, first: list[dict] = (), prune_after: int = 3) -> None:
    """One worker: trials until the study has ``trials`` finished ones. ``first``: parameters of the first
    trials of a new study (``enqueue_trial``), before the sampler chooses."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = open_study(study, seed, prune_after)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if sum(t.state in finished for t in s.trials) >= study.trials:
        return
    if not s.trials:
        for params in first:
            s.enqueue_trial(params)
    s.optimize(objective_for(study, base, overrides, space), catch=(Exception,),
               callbacks=[optuna.study.MaxTrialsCallback(study.trials, states=finished), _stop_on_failures(study.trials),
                          _show_trial(study)])


def _show_trial(study: Study):
    """One progress line per finished trial: its settings and its result."""
    def callback(s, trial) -> None:
        settings = ", ".join(f"{k.split('.')[-1]} {v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]} {v}"
                             for k, v in trial.params.items())
        values = trial.values or []
        result = ", ".join(f"{name} {v:,.0f}" if float(v).is_integer() and abs(v) >= 1e4 else f"{name} {v:.4g}"
                           for (name, _), v in zip(study.objectives, values))
        phase(s.study_name, f"trial {trial.number + 1}/{study.trials}: {settings}: "
                            f"{result or trial.state.name.lower()}")
    return callback


def _stop_on_failures(limit: int):
    """A space where every trial fails would otherwise run forever: stop after ``limit`` failures."""
    import optuna

    def callback(s, trial) -> None:
        if sum(t.state == optuna.trial.TrialState.FAIL for t in s.trials) >= max(limit, 3):
            print(f"stopping study {s.study_name}: {limit}+ trials failed; see their run directories' "
                  "status.json", file=sys.stderr)
            s.stop()
    return callback


OWN_FILES = ("study.db", "best.yaml", "summary.yaml")


def study_entry(p: Path) -> bool:
    """Whether ``p``, in a study folder, is something a study wrote: its trial-NNNN runs, study.db and
    SQLite's side files, best.yaml, summary.yaml, or what a killed write left."""
    if is_temporary(p.name):
        return True
    if p.is_dir() and not p.is_symlink():
        return re.fullmatch(r"trial-\d{4,}", p.name) is not None or not any(p.iterdir())
    return p.name in OWN_FILES or re.fullmatch(r"study\.db-(journal|wal|shm)", p.name) is not None
