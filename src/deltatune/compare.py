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

import html
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import html_report as hr
from .configure import load_config
from .errors import DeltatuneError, OutputError
from .fs import atomic_write_text, foreign_entries, is_temporary
from .metrics import bootstrap_rows, interval, metric_on, paired_difference
from .registry_db import main_metric
from .rundir import OUTCOMES, RunDir
from .train.progress import phase

COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
          "#eeca3b", "#17becf"]
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
    from .methods import registry

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

    from .tasks import registry as tasks
    from .train import study as studies

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
    from .train.study import study_entry

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
    from .train.run import train

    try:
        train(load_config(base, overrides), kind="compare")
    except DeltatuneError as exc:
        return str(exc)
    return None


def _resume_one(path: str) -> str | None:
    from .train.run import resume

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


# ----------------------------------------------------------------------------- analysis

def _finished(entry: dict) -> list[dict]:
    return [r for r in entry.get("runs", []) if "metrics" in r]


def _outcomes(run: dict) -> dict | None:
    path = Path(run["run"]) / OUTCOMES
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def analyse(results: list[dict], resamples: int = 2000, seed: int = 0) -> dict:
    """Per method: mean and spread of the main metric over its seeds, its bootstrap interval over the
    evaluation examples and the paired difference to the best method; the recommendation. Methods whose
    runs kept no per-example outcomes (or were evaluated on other examples) get means only."""
    ok = [e for e in results if _finished(e)]
    if not ok:
        return {"recommendation": "No method finished: see each method's error."}
    name, higher = main_metric(_finished(ok[0])[0]["metrics"])
    sign = 1.0 if higher else -1.0
    summary: dict[str, dict] = {}
    for e in ok:
        values = [r["metrics"]["eval"][name] for r in _finished(e)]
        summary[e["method"]] = {"metric": name, "mean": statistics.fmean(values), "values": values,
                                "sd": statistics.stdev(values) if len(values) > 1 else None}
    best = max(ok, key=lambda e: sign * summary[e["method"]]["mean"])["method"]
    found = _bootstrap(ok, resamples, seed)
    boot, paired = found if found else (None, False)
    if boot is not None:
        for method, values in boot.items():
            low, high = interval(values)
            summary[method]["ci"] = [low, high]
            if paired and method != best:  # better-minus-other, in the metric's better direction
                diff = paired_difference(sign * boot[best], sign * values)
                summary[method]["vs_best"] = {**diff, "low": diff["low"] if higher else -diff["high"],
                                              "high": diff["high"] if higher else -diff["low"]}
    return {"metric": name, "higher_is_better": higher, "best": best, "methods": summary,
            "paired": paired, "contended": _contended(ok), "recommendation": recommend(ok, summary, best, paired)}


def _bootstrap(ok: list[dict], resamples: int, seed: int) -> tuple[dict[str, np.ndarray], bool] | None:
    """Per method, its main metric on each bootstrap resample of the evaluation examples, averaged over its
    seeds, and whether the methods are paired. A seed sets the train/eval split as well, so the runs of one
    seed share their evaluation examples across methods: each seed's examples are resampled once (the same
    draws for every method), and the methods are paired when every method has every seed, evaluated on
    the same examples. None when a run kept no per-example outcomes."""
    kept: dict[str, dict[int, dict]] = {}
    fingerprints: dict[int, set] = {}
    for e in ok:
        kept[e["method"]] = {}
        for r in _finished(e):
            outcomes = _outcomes(r)
            if outcomes is None:
                return None
            kept[e["method"]][r["seed"]] = outcomes
            fingerprints.setdefault(r["seed"], set()).add((r["metrics"].get("data_fingerprint"),
                                                           len(outcomes["numerator"])))
    draws = {s: bootstrap_rows(next(iter(f))[1], resamples, seed + s) for s, f in fingerprints.items()}
    paired = all(len(f) == 1 for f in fingerprints.values()) and \
        len({frozenset(by_seed) for by_seed in kept.values()}) == 1
    boot = {m: np.mean([metric_on(o, draws[s]) for s, o in by_seed.items()], axis=0) for m, by_seed in kept.items()}
    return boot, paired


def _contended(ok: list[dict]) -> list[str]:
    """The runs that shared the machine (their times are not comparable): "method seed N"."""
    return [f"{e['method']} seed {r['seed']}" for e in ok for r in _finished(e)
            if r["metrics"].get("machine_load", {}).get("contended")]


def train_seconds(entry: dict) -> float | None:
    """Median training time over the method's runs that had the machine to themselves (None: none did)."""
    alone = [r["metrics"]["train_seconds"] for r in _finished(entry)
             if not r["metrics"].get("machine_load", {}).get("contended")]
    return statistics.median(alone) if alone else None


def _mean_of(entry: dict, key) -> float:
    return statistics.fmean(key(r) for r in _finished(entry))


def recommend(ok: list[dict], summary: dict, best: str, paired: bool) -> str:
    """Which method to pick, in words: the best by the metric unless others are within the evaluation's
    noise of it (paired bootstrap, 95 %), in which case the one among those with the smallest delta."""
    by_name = {e["method"]: e for e in ok}
    s = summary[best]
    metric = s["metric"]
    if len(ok) == 1:
        return f"Only {best} finished: nothing to compare it with."
    if not paired:
        return (f"{best} has the best mean {metric} ({s['mean']:.4f}). The runs kept no per-example results for "
                "the same evaluation examples, so whether the differences exceed the evaluation's noise is not "
                "known: read the table with that in mind.")
    tied = [m for m in summary if m == best or not summary[m].get("vs_best", {}).get("significant", True)]
    size = {m: _mean_of(by_name[m], lambda r: r["delta_bytes"]) for m in tied}
    if len(tied) == 1:
        others = ", ".join(f"{m} (p {summary[m]['vs_best']['p']:.3g})" for m in summary if m != best)
        return (f"Pick {best}: its {metric} ({s['mean']:.4f}) is better than every other method's beyond the "
                f"evaluation's noise (paired bootstrap over the same examples, 95 %: {others}).")
    pick = min(tied, key=lambda m: (size[m], m != best))
    sizes = ", ".join(f"{m} {size[m] / 1e6:.2f} MB" for m in sorted(tied, key=size.get))
    if pick == best:
        text = (f"Pick {best}: the best mean {metric} ({s['mean']:.4f}) and the smallest delta of the methods "
                f"within the evaluation's noise of it (paired bootstrap over the same examples, 95 %; {sizes}).")
    else:
        d = summary[pick]["vs_best"]
        text = (f"Pick {pick}: its {metric} ({summary[pick]['mean']:.4f}) is within the evaluation's noise of the "
                f"best, {best} ({s['mean']:.4f}; difference {s['mean'] - summary[pick]['mean']:+.4f}, 95 % interval "
                f"{d['low']:+.4f} to {d['high']:+.4f}, p {d['p']:.3g}, paired bootstrap over the same examples), and "
                f"of the methods within that noise it has the smallest delta ({sizes}).")
    seconds = {m: train_seconds(by_name[m]) for m in tied}
    if all(v is not None for v in seconds.values()):
        fastest = min(seconds, key=seconds.get)
        text += f" Fastest to train among them: {fastest} ({seconds[fastest]:.1f} s)."
    memory = {m: _mean_of(by_name[m], lambda r: r["metrics"]["peak_rss_mb"]) for m in tied}
    lightest = min(memory, key=memory.get)
    text += f" Least memory: {lightest} ({memory[lightest]:.0f} MB peak)."
    better = [m for m in summary if summary[m].get("vs_best", {}).get("significant")]
    if better:
        text += f" Significantly worse than {best}: {', '.join(better)}."
    return text


def pareto(points: list[tuple[float, float]], higher_better: bool) -> list[int]:
    """Indices of points (params, metric) that no other point beats on both (fewer params, better metric)."""
    def dominates(a, b) -> bool:  # a is no larger and no worse than b, and strictly one of them
        (pa, ma), (pb, mb) = a, b
        no_worse = ma >= mb if higher_better else ma <= mb
        return pa <= pb and no_worse and (pa < pb or ma != mb)
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


# ----------------------------------------------------------------------------- HTML

def _esc(value) -> str:
    return html.escape(str(value))


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def _table(results: list[dict], analysis: dict) -> str:
    """Two tables, one row per method: how well it did (the metric, its noise, the test against the best), then
    what it cost (parameters, delta, time, memory, forgetting)."""
    ok = [e for e in results if _finished(e)]
    if not ok:
        return "<p>No method finished.</p>"
    name, summary = analysis["metric"], analysis["methods"]
    first = _finished(ok[0])[0]["metrics"]["eval"]
    labels = list(first.get("per_class", {}))
    head = ["method", "learning rate", f"{name} mean", "sd over seeds", "95 % interval", f"vs best ({analysis['best']})",
            f"{name} before tuning"] + (["macro-F1"] if "macro_f1" in first else []) + [f"F1 {x}" for x in labels]
    forgets = any("forgetting" in r["metrics"] for e in ok for r in _finished(e))
    cost_head = ["method", "trainable parameters", "trainable share", "delta size", "train time", "peak memory"] + (
        ["forgetting: general-text perplexity after / before"] if forgets else [])
    rows, costs = [], []
    for e in results:
        if not _finished(e):
            errors = [e["error"]] if "error" in e else [r["error"] for r in e.get("runs", []) if "error" in r]
            rows.append(f"<tr><th class='l'>{_esc(e['method'])}</th><td colspan='{len(head) - 1}' class='l'>failed: "
                        f"{_esc('; '.join(errors))}</td></tr>")
            continue
        runs, s = _finished(e), summary[e["method"]]
        mean = lambda key: statistics.fmean(key(r["metrics"]) for r in runs)  # noqa: E731
        vs = s.get("vs_best")
        versus = "best" if e["method"] == analysis["best"] else (
            f"{vs['low']:+.4f} to {vs['high']:+.4f}, p {vs['p']:.2g}{' *' if vs['significant'] else ''}" if vs else "–")
        lr = "not used" if e.get("lr") is None else f"{e['lr']:.3g}"
        cells = [lr, f"{_fmt(s['mean'])} ({len(runs)})", _fmt(s["sd"]) if s["sd"] is not None else "–",
                 f"{_fmt(s['ci'][0])} – {_fmt(s['ci'][1])}" if "ci" in s else "–", versus,
                 _fmt(runs[0]["metrics"]["baseline"][name])]
        cells += [_fmt(mean(lambda m: m["eval"]["macro_f1"]))] if "macro_f1" in first else []
        cells += [f"{mean(lambda m: m['eval']['per_class'][x]['f1']):.3f}" for x in labels]
        rows.append(_row(e["method"], cells))
        m = runs[0]["metrics"]
        forgetting = [r["metrics"].get("forgetting", {}).get("ratio") for r in runs]
        seconds = train_seconds(e)
        cost = [hr.count(m["trainable_params"]), hr.percent(m["trainable_params"], m["total_params"]),
                hr.size(statistics.fmean(r["delta_bytes"] for r in runs)),
                f"{seconds:,.1f} s" if seconds is not None else "shared machine",
                f"{mean(lambda m: m['peak_rss_mb']):,.0f} MB"]
        cost += [f"x{statistics.fmean(forgetting):.2f}" if all(forgetting) else "–"] if forgets else []
        costs.append(_row(e["method"], cost))
    return (_table_means(ok, analysis) + _grid(head, rows) + _LEGEND + "<h2>What each method costs</h2>"
            + _cost_means(ok) + _grid(cost_head, costs) + _COST_LEGEND)


def _row(method: str, cells: list[str]) -> str:
    return f"<tr><th class='l'>{_esc(method)}</th>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>"


def _grid(head: list[str], rows: list[str]) -> str:
    return ("<table><tr>" + "".join(f"<th{' class=l' if i == 0 else ''}>{_esc(h)}</th>" for i, h in enumerate(head))
            + "</tr>" + "".join(rows) + "</table>")


def _cost_means(ok: list[dict]) -> str:
    """The cost table in a line: the range of trainable parameters and of delta sizes."""
    params = {e["method"]: _finished(e)[0]["metrics"]["trainable_params"] for e in ok}
    sizes = {e["method"]: _mean_of(e, lambda r: r["delta_bytes"]) for e in ok}
    few, many = min(params, key=params.get), max(params, key=params.get)
    small, big = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    text = (f"Trainable parameters run from {hr.count(params[few])} ({_esc(few)}) to {hr.count(params[many])} "
            f"({_esc(many)}); the delta a method saves from {hr.size(sizes[small])} ({_esc(small)}) to "
            f"{hr.size(sizes[big])} ({_esc(big)}).") if len(ok) > 1 else ""
    return hr.means(text) if text else ""


def _table_means(ok: list[dict], analysis: dict) -> str:
    """What the table says, in a line: the best, who is within its noise, who is worse, the untuned model."""
    name, summary, best = analysis["metric"], analysis["methods"], analysis["best"]
    better = "higher" if analysis.get("higher_is_better", True) else "lower"
    text = f"<b>{_esc(best)}</b> has the best mean {_esc(name)} ({_fmt(summary[best]['mean'])}; {better} is better)."
    tied = [m for m, s in summary.items() if m != best and "vs_best" in s and not s["vs_best"]["significant"]]
    worse = [m for m, s in summary.items() if s.get("vs_best", {}).get("significant")]
    if tied:
        text += f" Within the evaluation's noise of it (no significant difference): {_esc(', '.join(tied))}."
    if worse:
        text += f" Significantly worse: {_esc(', '.join(worse))}."
    baseline = _finished(ok[0])[0]["metrics"].get("baseline", {}).get(name)
    if baseline is not None:
        text += f" Before tuning the model scored {_fmt(baseline)}."
    return hr.means(text)


_LEGEND = ("<p class='small'>Mean over the seeds (their number in brackets). <i>vs best</i>: the best method's metric "
           "minus this one's on the same evaluation examples (paired bootstrap, 95 % interval, p-value; * significant)."
           "</p>")
_COST_LEGEND = ("<p class='small'>Trainable share: trainable parameters as a share of the model's. Delta size: what "
                "the method saves (mean over seeds). Train time: median over the runs that had the machine to "
                "themselves. Peak memory: the training process's resident memory (mean over seeds).</p>")


def _searches(results: list[dict]) -> str:
    """Each method's learning-rate trials: rate, state, score."""
    rows, edges = [], []
    for e in results:
        trials = e.get("search", [])
        if not trials:
            continue
        tried = sorted((t for t in trials if t.get("lr") is not None), key=lambda t: t["lr"])
        cells = "; ".join(("<b class='t'>{}</b>" if t["lr"] == e.get("lr") else "<span class='t'>{}</span>").format(_esc(
            f"{t['lr']:.3g}: {t['value']:.4f}" if "value" in t else f"{t['lr']:.3g}: {t['state']}")) for t in tried)
        edge = ""
        if len(tried) > 1 and e.get("lr") in (tried[0]["lr"], tried[-1]["lr"]):
            top = e["lr"] == tried[-1]["lr"]
            edge = (f". The chosen rate is the {'highest' if top else 'lowest'} tried: a {'higher' if top else 'lower'} "
                    "one may be better still")
            edges.append(e["method"])
        rows.append(f"<tr><th class='l'>{_esc(e['method'])}</th><td class='l'>{_esc(e.get('lr_choice', '') + edge)}</td>"
                    f"<td class='l'>{cells}</td></tr>")
    if not rows:
        return ""
    said = (f"The chosen rate is at the edge of the range tried for {_esc(', '.join(edges))}: a rate beyond it may do "
            "better." if edges else "Every chosen rate lies inside the range tried.")
    return ("<h2>Learning-rate search</h2>" + hr.means(said) + "<p class='small'>Each method's trials by rate (rate: "
            "score on the evaluation split, or pruned / failed); the chosen rate, in bold, trained the seeds above."
            "</p><table><tr><th class='l'>method</th><th class='l'>how chosen</th><th class='l'>trials</th></tr>" + "".join(rows) + "</table>")


def _flat(results: list[dict], analysis: dict) -> list[dict]:
    """One row per finished method for the plots: its first seed's run, with the seeds' mean metric."""
    out = []
    for e in results:
        runs = _finished(e)
        if runs:
            metrics = dict(runs[0]["metrics"])
            metrics["eval"] = {**metrics["eval"], analysis["metric"]: analysis["methods"][e["method"]]["mean"]}
            out.append({"method": e["method"], **runs[0], "metrics": metrics})
    return out


def _params(n: float) -> str:
    """A power of ten as a person says it: 1,000 -> '1k', 1e7 -> '10M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def _placed(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Where each point's label (x, y, text) goes: right of the point, else left of it, else a line lower or
    higher, whichever first overlaps no point and no label placed before it; as (x, baseline y, text-anchor)."""
    boxes = [(x - 6, x + 6, y - 6, y + 6) for x, y, _ in points]  # x0, x1, y0, y1: the points
    out = []
    for x, y, text in points:
        width = 6.5 * len(text)
        for dy in (0, 13, -13, 26, -26, 39):
            spots = [(x + 8, x + 8 + width, "start"), (x - 8 - width, x - 8, "end")]
            free = [(a, b, anchor) for a, b, anchor in spots if not any(
                a < bx1 and bx0 < b and y + dy - 6 < by1 and by0 < y + dy + 6 for bx0, bx1, by0, by1 in boxes)]
            if free:
                break
        a, b, anchor = (free or spots)[0]
        boxes.append((a, b, y + dy - 6, y + dy + 6))
        out.append((x + 8 if anchor == "start" else x - 8, y + dy + 4, anchor))
    return out


def _scatter(results: list[dict], colors: dict, w: int = 640, h: int = 360) -> str:
    ok = [r for r in results if "metrics" in r]
    if not ok:
        return ""
    name, higher = main_metric(ok[0]["metrics"])
    pts = [(max(r["metrics"]["trainable_params"], 1), r["metrics"]["eval"][name]) for r in ok]
    xs, ys = [math.log10(p) for p, _ in pts], [m for _, m in pts]
    x0, x1 = math.floor(min(xs) - 0.2), math.ceil(max(xs) + 0.2)
    pad = 0.05 * ((max(ys) - min(ys)) or abs(max(ys)) or 1)
    frame = hr.Frame(w, h, [(t, _params(10 ** t)) for t in range(x0, x1 + 1)],
                     hr.value_ticks(min(ys) - pad, max(ys) + pad, 5), "trainable parameters (log scale)",
                     f"{name} ({'higher' if higher else 'lower'} is better)", right=120)
    front = sorted(pareto(pts, higher), key=lambda i: pts[i][0])
    parts = [frame.open(f"{name} against trainable parameters")]
    if len(front) > 1:
        line = " ".join(f"{frame.px(xs[i]):.1f},{frame.py(ys[i]):.1f}" for i in front)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    texts = [f"{r['method']}{' *' if i in front else ''}" for i, r in enumerate(ok)]
    spots = _placed([(frame.px(xs[i]), frame.py(ys[i]), t) for i, t in enumerate(texts)])
    for i, r in enumerate(ok):
        x, y, anchor = spots[i]
        parts.append(f'<circle cx="{frame.px(xs[i]):.1f}" cy="{frame.py(ys[i]):.1f}" r="5" fill="{colors[r["method"]]}">'
                     f'<title>{_esc(r["method"])}: {ys[i]:.4f}, {pts[i][0]:,} trainable parameters</title></circle>'
                     f'<text x="{x:.1f}" y="{y:.1f}" font-size="12" text-anchor="{anchor}">{_esc(texts[i])}</text>')
    said = (f"Each method's mean {_esc(name)} over its seeds against how many parameters it trains. The dashed line "
            f"joins the Pareto front (*): the methods that no other beats with fewer trainable parameters and a better "
            f"{_esc(name)}: {_esc(', '.join(ok[i]['method'] for i in front))}.")
    return "<h2>Metric against trainable parameters</h2>" + hr.means(said) + "".join(parts) + "</svg>"


def _curves(results: list[dict], colors: dict, w: int = 640, h: int = 320) -> str:
    ok = [r for r in results if r.get("curve")]
    if not ok:
        return ""
    steps = [s for r in ok for s, _ in r["curve"]]
    losses = [v for r in ok for _, v in r["curve"]]
    frame = hr.Frame(w, h, hr.value_ticks(0, max(steps) or 1, 6, integer=True),
                     hr.value_ticks(min(losses), max(losses), 5), "optimizer step", "training loss",
                     xrange=(0, max(steps) or 1))
    parts = [frame.open("training loss by step")]
    for r in ok:
        pts = " ".join(f"{frame.px(s):.1f},{frame.py(v):.1f}" for s, v in r["curve"])
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colors[r["method"]]}" stroke-width="1.5">'
                     f"<title>{_esc(r['method'])}</title></polyline>")
    without = [r["method"] for r in results if not r.get("curve")]
    said = ("Training loss of each method's first seed at every logged step: one batch's loss, so it is noisy; "
            "look at the trend." + (f" No curve for {_esc(', '.join(without))} (fitted directly, no steps)." if without else ""))
    return ("<h2>Learning curves (training loss)</h2>" + hr.means(said) + "".join(parts) + "</svg>"
            + hr.legend([(r["method"], colors[r["method"]]) for r in ok]))


def _confusions(results: list[dict]) -> str:
    out = []
    for r in results:
        m = r.get("metrics", {}).get("eval", {})
        if "confusion_matrix" not in m:
            continue
        labels, matrix = list(m["per_class"]), m["confusion_matrix"]
        top = max(max(row) for row in matrix) or 1
        cells = "".join(f"<th>{_esc(x)}</th>" for x in labels)
        body = "".join("<tr><th>" + _esc(labels[i]) + "</th>" + "".join(
            f'<td style="background:rgba(76,120,168,{v / top:.2f});color:{"#fff" if v / top > 0.6 else "#222"}">'
            f"{hr.count(v)}</td>" for v in row) + "</tr>" for i, row in enumerate(matrix))
        out.append(f"<div class='cm'><h3>{_esc(r['method'])}</h3><table><tr><th>true \\ predicted</th>{cells}</tr>{body}</table></div>")
    said = ("Rows are the true classes, columns the predicted ones (each method's first seed, on the evaluation "
            "split): the diagonal counts correct predictions, and darker cells hold more examples.")
    return "<h2>Confusion matrices</h2>" + hr.means(said) + "".join(out) if out else ""


def _finished_at(results: list[dict]) -> str | None:
    """When the last of the runs finished (their status.json), as text; None if none says."""
    times = []
    for e in results:
        for r in _finished(e):
            try:
                times.append(json.loads((Path(r["run"]) / "status.json").read_text(encoding="utf-8"))["time"])
            except (OSError, ValueError, KeyError):
                continue
    return hr.when(max(times)) if times else None


def _contention_banner(contended: list[str]) -> str:
    if not contended:
        return ""
    return hr.banner(
        f"{len(contended)} {'run' if len(contended) == 1 else 'runs'} shared the machine with other work while "
        f"training: {_esc(', '.join(contended))}. Their training times are not comparable and are left out: "
        "<i>train time</i> is the median over the runs that had the machine to themselves (<i>shared machine</i> "
        "where none did). Metrics, delta sizes and peak memory are not affected.")


def render(results: list[dict], analysis: dict, budget: Budget, folder: Path | None = None) -> str:
    """The comparison as a page for people; ``folder`` (the comparison's) defaults to the one its runs are in."""
    if folder is None:
        runs = [Path(r["run"]) for e in results for r in e.get("runs", []) if "run" in r]
        folder = runs[0].parent.parent if runs else None
    colors = {e["method"]: COLORS[i % len(COLORS)] for i, e in enumerate(results)}
    flat = _flat(results, analysis)
    search = (f"a learning-rate search of {budget.trials} trials per method (its default first), then "
              if budget.trials else "each method's default learning rate, ")
    notes = [f"{len(results)} methods, the same data and budget: {search}{budget.seeds} seed(s) of the chosen rate. "
             "A seed sets the initialisation, the data order and the train/eval split; every method trains on the "
             "same splits. Figures are means over the seeds."]
    if any("ci" in s for s in analysis.get("methods", {}).values()):
        notes.append("The interval is a 95 % bootstrap over the evaluation examples. " + (
            "<i>vs best</i> is the paired bootstrap difference on the same examples (best minus method, 95 %, "
            "p-value; * significant)." if analysis.get("paired") else
            "The methods were not evaluated on the same examples (a seed is missing), so they are not tested "
            "against each other."))
    else:
        notes.append("The runs kept no per-example results, so there are no intervals or tests.")
    finished = _finished_at(results)
    meta = ([("Folder", str(folder))] if folder else []) + [
        ("Runs finished", finished) if finished else ("Written", hr.when(None))]
    if "metric" in analysis:
        meta.append(("Metric", f"{analysis['metric']} ({'higher' if analysis.get('higher_is_better', True) else 'lower'} "
                               "is better)"))
    meta.append(("Budget per method", f"{budget.trials} rate trials, {budget.seeds} seeds"))
    body = "".join([_contention_banner(analysis.get("contended", [])),
                    f"<p class='pick'>{_esc(analysis['recommendation'])}</p>",
                    "".join(f"<p>{n}</p>" for n in notes), "<h2>How well each method did</h2>", _table(results, analysis),
                    _searches(results), _scatter(flat, colors), _curves(flat, colors), _confusions(flat)])
    style = ("table th,table td{text-align:right}table td{white-space:nowrap}table th.l,table td.l{text-align:left;"
             "white-space:normal}.t{white-space:nowrap}.cm{display:inline-block;margin-right:2em;vertical-align:top}")
    return hr.page("deltatune method comparison", meta, body, style)
