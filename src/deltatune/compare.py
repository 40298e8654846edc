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
    atomic_write_text(report, render(results, analysis, budget))
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
    ok = [e for e in results if _finished(e)]
    if not ok:
        return "<p>No method finished.</p>"
    name, summary = analysis["metric"], analysis["methods"]
    first = _finished(ok[0])[0]["metrics"]["eval"]
    labels = list(first.get("per_class", {}))
    head = ["method", "learning rate", f"{name} mean", "sd (seeds)", "95 % interval", f"vs best {analysis['best']}",
            f"baseline {name}"] + (["macro-F1"] if "macro_f1" in first else []) + [f"F1 {x}" for x in labels] + \
           ["trainable", "trainable %", "delta MB", "train s", "peak MB"]
    forgets = any("forgetting" in r["metrics"] for e in ok for r in _finished(e))
    head += ["forgetting (ppl ratio)"] if forgets else []
    rows = []
    for e in results:
        if not _finished(e):
            errors = [e["error"]] if "error" in e else [r["error"] for r in e.get("runs", []) if "error" in r]
            rows.append(f"<tr><td>{_esc(e['method'])}</td><td colspan='{len(head) - 1}' class='l'>failed: "
                        f"{_esc('; '.join(errors))}</td></tr>")
            continue
        runs, s = _finished(e), summary[e["method"]]
        mean = lambda key: statistics.fmean(key(r["metrics"]) for r in runs)  # noqa: E731
        vs = s.get("vs_best")
        versus = "best" if e["method"] == analysis["best"] else (
            f"{vs['low']:+.4f} to {vs['high']:+.4f}, p {vs['p']:.2g}{' *' if vs['significant'] else ''}" if vs else "-")
        lr = "not used" if e.get("lr") is None else f"{e['lr']:.3g}"
        cells = [e["method"], lr, f"{_fmt(s['mean'])} ({len(runs)})", _fmt(s["sd"]) if s["sd"] is not None else "-",
                 f"{_fmt(s['ci'][0])} – {_fmt(s['ci'][1])}" if "ci" in s else "-", versus,
                 _fmt(runs[0]["metrics"]["baseline"][name])]
        cells += [_fmt(mean(lambda m: m["eval"]["macro_f1"]))] if "macro_f1" in first else []
        cells += [f"{mean(lambda m: m['eval']['per_class'][x]['f1']):.3f}" for x in labels]
        m = runs[0]["metrics"]
        forgetting = [r["metrics"].get("forgetting", {}).get("ratio") for r in runs]
        seconds = train_seconds(e)
        cells += [f"{m['trainable_params']:,}", f"{100 * m['trainable_params'] / m['total_params']:.3f}",
                  f"{statistics.fmean(r['delta_bytes'] for r in runs) / 1e6:.2f}",
                  f"{seconds:.1f}" if seconds is not None else "shared machine",
                  f"{mean(lambda m: m['peak_rss_mb']):.0f}"]
        cells += [f"{statistics.fmean(forgetting):.3f}" if all(forgetting) else "-"] if forgets else []
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def _searches(results: list[dict]) -> str:
    """Each method's learning-rate trials: rate, state, score."""
    rows = []
    for e in results:
        trials = e.get("search", [])
        if not trials:
            continue
        tried = sorted((t for t in trials if t.get("lr") is not None), key=lambda t: t["lr"])
        cells = "; ".join(("<b>{}</b>" if t["lr"] == e.get("lr") else "{}").format(_esc(
            f"{t['lr']:.3g}: {t['value']:.4f}" if "value" in t else f"{t['lr']:.3g}: {t['state']}")) for t in tried)
        edge = ""
        if len(tried) > 1 and e.get("lr") in (tried[0]["lr"], tried[-1]["lr"]):
            top = e["lr"] == tried[-1]["lr"]
            edge = (f". The chosen rate is the {'highest' if top else 'lowest'} tried: a {'higher' if top else 'lower'} "
                    "one may be better still")
        rows.append(f"<tr><td>{_esc(e['method'])}</td><td class='l'>{_esc(e.get('lr_choice', '') + edge)}</td>"
                    f"<td class='l'>{cells}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Learning-rate search</h2><p>Each method's trials by rate (rate: score on the evaluation split, or "
            "pruned / failed); the chosen rate, in bold, trained the seeds above.</p><table><tr><th>method</th>"
            "<th>how chosen</th><th>trials</th></tr>" + "".join(rows) + "</table>")


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


def _scatter(results: list[dict], w: int = 560, h: int = 320) -> str:
    ok = [r for r in results if "metrics" in r]
    if not ok:
        return ""
    name, higher = main_metric(ok[0]["metrics"])
    pts = [(max(r["metrics"]["trainable_params"], 1), r["metrics"]["eval"][name]) for r in ok]
    xs, ys = [math.log10(p) for p, _ in pts], [m for _, m in pts]
    x0, x1 = min(xs) - 0.2, max(xs) + 0.2
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))
    px = lambda x: 50 + (x - x0) / (x1 - x0) * (w - 70)  # noqa: E731
    py = lambda y: h - 40 - (y - y0) / (y1 - y0) * (h - 60)  # noqa: E731
    front = sorted(pareto(pts, higher), key=lambda i: pts[i][0])
    parts = [f'<svg role="img" aria-label="{name} against trainable parameters" width="{w}" height="{h}">',
             f'<line x1="50" y1="{h - 40}" x2="{w - 10}" y2="{h - 40}" stroke="#333"/>'
             f'<line x1="50" y1="10" x2="50" y2="{h - 40}" stroke="#333"/>',
             f'<text x="{w / 2 - 80}" y="{h - 8}" font-size="12">trainable parameters (log10)</text>'
             f'<text x="4" y="20" font-size="12">{_esc(name)}</text>']
    for tick in range(math.ceil(x0), math.floor(x1) + 1):
        parts.append(f'<text x="{px(tick) - 8:.1f}" y="{h - 24}" font-size="11">1e{tick}</text>')
    if len(front) > 1:
        line = " ".join(f"{px(xs[i]):.1f},{py(ys[i]):.1f}" for i in front)
        parts.append(f'<polyline points="{line}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
    for i, r in enumerate(ok):
        parts.append(f'<circle cx="{px(xs[i]):.1f}" cy="{py(ys[i]):.1f}" r="5" fill="{COLORS[i % len(COLORS)]}">'
                     f'<title>{_esc(r["method"])}: {ys[i]:.4f}, {pts[i][0]:,} params</title></circle>'
                     f'<text x="{px(xs[i]) + 7:.1f}" y="{py(ys[i]) + 4:.1f}" font-size="11">{_esc(r["method"])}'
                     f'{" *" if i in front else ""}</text>')
    return "<h2>Metric against trainable parameters</h2><p>* on the Pareto front (dashed).</p>" + "".join(parts) + "</svg>"


def _curves(results: list[dict], w: int = 560, h: int = 280) -> str:
    ok = [r for r in results if r.get("curve")]
    if not ok:
        return ""
    steps = [s for r in ok for s, _ in r["curve"]]
    losses = [v for r in ok for _, v in r["curve"]]
    s1, l0, l1 = max(steps) or 1, min(losses), max(losses)
    px = lambda s: 50 + s / s1 * (w - 70)  # noqa: E731
    py = lambda v: h - 30 - (v - l0) / ((l1 - l0) or 1) * (h - 50)  # noqa: E731
    parts = [f'<svg role="img" aria-label="training loss by step" width="{w}" height="{h + 20 * len(ok)}">',
             f'<line x1="50" y1="{h - 30}" x2="{w - 10}" y2="{h - 30}" stroke="#333"/>'
             f'<text x="{w / 2}" y="{h - 10}" font-size="12">step (max {s1})</text>'
             f'<text x="4" y="20" font-size="12">loss {l1:.2f}</text><text x="4" y="{h - 34}" font-size="12">{l0:.2f}</text>']
    for i, r in enumerate(ok):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in r["curve"])
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>'
                     f'<text x="60" y="{h + 14 + 20 * i}" font-size="12" fill="{color}">{_esc(r["method"])}</text>')
    return "<h2>Learning curves (training loss)</h2>" + "".join(parts) + "</svg>"


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
            f'<td style="background:rgba(76,120,168,{v / top:.2f})">{v}</td>' for v in row) + "</tr>"
            for i, row in enumerate(matrix))
        out.append(f"<div class='cm'><h3>{_esc(r['method'])}</h3><table><tr><th>true \\ predicted</th>{cells}</tr>{body}</table></div>")
    return "<h2>Confusion matrices</h2>" + "".join(out) if out else ""


def render(results: list[dict], analysis: dict, budget: Budget) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin-bottom:1em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}td{white-space:nowrap}"
             "td.l{text-align:left;white-space:normal}"
             ".cm{display:inline-block;margin-right:2em;vertical-align:top}.pick{font-size:15px;background:#eef5ee;"
             "padding:8px 12px;border-left:4px solid #54a24b}")
    flat = _flat(results, analysis)
    search = (f"a learning-rate search of {budget.trials} trials per method (its default first), then "
              if budget.trials else "each method's default learning rate, ")
    contended = analysis.get("contended", [])
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
    if contended:
        notes.append(f"Shared the machine with other work while training (times not shown, not comparable): "
                     f"{_esc(', '.join(contended))}. Train s is the median over runs that had it to themselves.")
    body = "".join([f"<h1>deltatune method comparison</h1><p class='pick'>{_esc(analysis['recommendation'])}</p>",
                    "".join(f"<p>{n}</p>" for n in notes), _table(results, analysis), _searches(results),
                    _scatter(flat), _curves(flat), _confusions(flat)])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>deltatune compare</title>'
            f"<style>{style}</style></head><body>{body}</body></html>\n")
