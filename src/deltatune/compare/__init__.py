"""`deltatune compare`: every method at its own best on the same data and budget, in one self-contained
HTML report that says which method to pick and why.

Per method (``<folder>/<method>/``), with the same budget for each:

1. a learning-rate search (``search/``, an Optuna study of ``Budget.trials`` trials with median pruning):
   the method's own default rate first (``Method.default_lr``), then 3x, 1/3x, 10x and 1/10x of it, then
   Optuna's choice within 1/10x..10x; trials are ordinary runs scored on the evaluation split. Methods
   whose delta is fitted directly (a feature-extraction head by L-BFGS) use no rate and skip it.
2. the chosen rate trained with ``Budget.seeds`` fresh seeds (``seed-1``, ...; never the search's seed, so
   the search's luck does not carry into the figures), each run in a new process so its peak memory is
   its own.

The report gives per method the mean and spread over seeds, a 95 % bootstrap interval over the evaluation
examples, and the paired bootstrap difference to the best method on the same examples (significant or
not); then says in words which method to pick: the best, or, when others are within the evaluation's
noise of it, the one among them with the smallest delta. Times come only from runs that had the machine
to themselves (``train/machine_load.py``); a run that shared it is marked, its time not shown. Plots are
inline SVG, so the page needs nothing else. The same command finishes an interrupted bake-off: completed
runs are reused, stopped ones resumed, the search goes on where it stopped.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..configure import load_config
from ..errors import DeltatuneError, OutputError
from ..fs import atomic_write_text, foreign_entries, is_temporary
from ..registry_db import main_metric
from ..rundir import RunDir
from ..train.progress import phase
from .analysis import analyse, pareto, recommend, train_seconds
from .report import render

__all__ = ["Budget", "run_compare", "check_folder", "analyse", "pareto", "recommend", "train_seconds", "render"]

# The search's first trials, as multiples of the method's default rate; later trials are Optuna's choice
# within the outer two.
LR_STEPS = (1.0, 3.0, 1 / 3, 10.0, 0.1)
SEARCH, SEED = "search", "seed-{}"


@dataclass(frozen=True)
class Budget:
    """What each method gets: learning-rate trials (0: its default rate, no search) and final seeds."""
    trials: int = 4
    seeds: int = 3
    resamples: int = 2000  # bootstrap resamples of the evaluation examples


def run_compare(base: str | None, overrides: list[str], methods: list[str], folder: Path,
                budget: Budget = Budget()) -> Path:
    """Search, train and analyse each method (a failure is reported, not fatal); write ``results.json`` and
    ``report.html`` in ``folder``, which must be new, empty or an earlier comparison's: nothing else in it
    is ever overwritten."""
    check_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = [_method(base, overrides, name, folder / name, budget) for name in methods]
    analysis = analyse(results, budget.resamples)
    atomic_write_text(folder / "results.json", json.dumps({"budget": vars(budget), "methods": results,
                                                           "analysis": analysis}, indent=2))
    report = folder / "report.html"
    atomic_write_text(report, render(results, analysis, budget, folder))
    return report


def _method(base: str | None, overrides: list[str], name: str, folder: Path, budget: Budget) -> dict:
    """One method: its rate (searched or default), then its seed runs."""
    from ..methods import registry

    try:
        cfg = load_config(base, [*overrides, f"method.name={name}"])
    except DeltatuneError as exc:
        print(f"compare: {name} cannot train: {exc}", file=sys.stderr)
        return {"method": name, "error": str(exc)}
    method = registry.get(name)
    entry: dict = {"method": name}
    if method.fits_directly(cfg.method.options):
        entry["lr_choice"] = f"not used: {cfg.train.lr_source.split(': ', 1)[-1]}"
        lr = None
    elif budget.trials:
        phase(name, f"searching the learning rate: {budget.trials} trials around its default {method.default_lr:g}")
        found = _in_fresh_process(_search, base, overrides, name, str(folder / SEARCH), budget.trials,
                                  method.default_lr, cfg.train.seed)
        if "error" in found:
            print(f"compare: {name}: the learning-rate search failed: {found['error']}", file=sys.stderr)
            return {**entry, "error": f"learning-rate search: {found['error']}", "search": found.get("trials", [])}
        lr, entry["search"] = found["lr"], found["trials"]
        phase(name, f"learning rate {lr:.3g} chosen; {budget.seeds} seed run(s) at it")
        entry["lr_choice"] = (f"searched: best of {len(found['trials'])} trials around the default "
                              f"{method.default_lr:g}")
    else:
        lr = cfg.train.lr
        entry["lr_choice"] = cfg.train.lr_source or "config"
    entry["lr"] = lr
    entry["runs"] = [_seed_run(base, overrides, name, folder / SEED.format(k), cfg.train.seed + k, lr)
                     for k in range(1, budget.seeds + 1)]
    return entry


def _seed_run(base, overrides, name: str, path: Path, seed: int, lr: float | None) -> dict:
    run = RunDir(path)
    trained_at = load_config(run.config, check_paths=False).train.lr if run.config.is_file() else None
    if lr is not None and trained_at is not None and not math.isclose(trained_at, lr, rel_tol=1e-9):
        error = (f"{run.path} trained at learning rate {trained_at:g}, but this comparison chose {lr:g} (its "
                 "search or --trials changed); remove that run or compare into a new --out")
        print(f"compare: {name}: {error}", file=sys.stderr)
        return {"seed": seed, "run": str(path), "error": error}
    if run.status() == "completed":  # an interrupted bake-off reruns only what is missing
        phase(name, f"{path.name} (train.seed {seed}): reusing the completed run in {run.path}")
    else:
        if run.config.is_file():  # stopped part-way (interrupted, killed): it goes on from its checkpoint
            phase(name, f"{path.name} (train.seed {seed}): resuming the run in {run.path}")
            error = _in_fresh_process(_resume_one, str(run.path))
        else:
            phase(name, f"{path.name} (train.seed {seed}): training in {run.path}")
            error = _in_fresh_process(_train_one, base, [
                *overrides, f"method.name={name}", f"train.seed={seed}", f"output_dir={run.path}",
                "train.progress=false", *([f"train.lr={lr}"] if lr is not None else [])])
        if error is not None:
            print(f"compare: {name} (seed {seed}) failed: {error}", file=sys.stderr)
            return {"seed": seed, "run": str(path), "error": error}
    result = _result(path)
    metric = main_metric(result["metrics"])[0]
    phase(name, f"{path.name}: {metric} {result['metrics'].get('eval', {}).get(metric, float('nan')):.4g}")
    return {"seed": seed, **result}


def _in_fresh_process(function, *args):
    """``function(*args)`` in a new process (``_fresh_processes``), under this process's environment as it is
    now: the fork server keeps the one it started with (DELTATUNE_REGISTRY, DELTATUNE_CACHE may differ)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_processes()) as pool:
        return pool.submit(_under, dict(os.environ), function, *args).result()


def _under(environment: dict, function, *args):
    os.environ.clear()
    os.environ.update(environment)
    return function(*args)


def _search(base, overrides, name: str, folder: str, trials: int, default_lr: float, seed: int) -> dict:
    """The method's learning-rate study (in its own process): the best rate and every trial, or the error."""
    import optuna

    from ..tasks import registry as tasks
    from ..train import study as studies

    cfg = load_config(base, [*overrides, f"method.name={name}"])
    metric = tasks.get(cfg.task).main_metric
    path = Path(folder)
    study = studies.Study(f"compare-{name}", path, f"sqlite:///{(path / 'study.db').resolve()}",
                      [(metric.name, metric.direction)], trials)
    space = {"train.lr": {"low": default_lr * min(LR_STEPS), "high": default_lr * max(LR_STEPS), "log": True}}
    path.mkdir(parents=True, exist_ok=True)
    fixed = [*overrides, f"method.name={name}", f"train.seed={seed}"]
    try:
        studies.optimize(study, base, fixed, space, seed, first=[{"train.lr": default_lr * f} for f in LR_STEPS[:trials]],
                     prune_after=2)
    except DeltatuneError as exc:
        return {"error": str(exc)}
    s = studies.open_study(study, seed)
    listed = [{"number": t.number, "lr": t.params.get("train.lr"), "state": t.state.name.lower(),
               **({"value": t.value} if t.state == optuna.trial.TrialState.COMPLETE else {}),
               **({"run": t.user_attrs["run_dir"]} if "run_dir" in t.user_attrs else {})} for t in s.trials]
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        return {"error": f"none of {len(s.trials)} trials completed (see the runs in {folder})", "trials": listed}
    return {"lr": s.best_trial.params["train.lr"], "trials": listed}


OWN_FILES = ("results.json", "report.html")


def check_folder(folder: Path) -> None:
    """``OutputError`` when ``folder`` holds anything a comparison did not write: a folder per method (its
    search study and seed-N runs), results.json and report.html are all it may hold."""
    from ..train.study import study_entry

    def a_run(p: Path) -> bool:  # a run (or one killed before it wrote anything)
        return p.is_dir() and not p.is_symlink() and (
            any((p / name).is_file() for name in ("status.json", "config.yaml"))
            or all(is_temporary(q.name) for q in p.iterdir()))

    def in_method(p: Path) -> bool:
        if is_temporary(p.name) or (re.fullmatch(SEED.format(r"\d+"), p.name) and a_run(p)):
            return True
        return p.name == SEARCH and p.is_dir() and not p.is_symlink() and not foreign_entries(p, study_entry)

    def ours(p: Path) -> bool:
        if is_temporary(p.name):  # what a killed write left
            return True
        if p.is_dir() and not p.is_symlink():  # a method's folder
            return not foreign_entries(p, in_method)
        return p.name in OWN_FILES

    foreign = foreign_entries(folder, ours)
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"--out {folder}: exists and is not a folder; choose another --out")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"--out {folder}: holds files that are not a deltatune comparison's ({shown}); compare "
                          "writes a run per method, results.json and report.html there and never overwrites "
                          "anything else: choose a new or empty --out (or an earlier comparison's, to finish it)")


def _fresh_processes():
    """Where each method trains: a new process, so its peak memory is its own. Forked from a server
    process that imported the trainer once (``forkserver``, which has done no parallel work, so forking
    it is safe for torch), not spawned: a spawned process spends ~9 s importing torch and peft before
    it trains. Spawn where there is no forkserver (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["deltatune.train.run"])
    return context


def _train_one(base: str | None, overrides: list[str]) -> str | None:
    """One method's run (in its own process); the error message if it could not train."""
    from ..train.run import train

    try:
        train(load_config(base, overrides), kind="compare")
    except DeltatuneError as exc:
        return str(exc)
    return None


def _resume_one(path: str) -> str | None:
    from ..train.run import resume

    try:
        resume(path)
    except DeltatuneError as exc:
        return str(exc)
    return None


def _result(path: Path) -> dict:
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    log = [json.loads(line) for line in (path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    delta = sum(f.stat().st_size for f in (path / "delta").rglob("*") if f.is_file())
    return {"run": str(path), "metrics": metrics, "delta_bytes": delta,
            "curve": [(r["step"], r["loss"]) for r in log if "loss" in r and r["loss"] is not None],
            "eval_curve": [(r["step"], r["eval"]) for r in log if "eval" in r]}

