"""What a comparison's runs say: per method the mean and spread over seeds, a bootstrap interval over the
evaluation examples, the paired difference to the best method, and the recommendation in words."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

from ..metrics import bootstrap_rows, interval, metric_on, paired_difference
from ..registry_db import main_metric
from ..rundir import OUTCOMES

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


