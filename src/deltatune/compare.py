"""`deltatune compare`: every method on the same data and budget, in one self-contained HTML report.

Each method trains as an ordinary run (``<folder>/<method>``, recorded in the run registry as
kind "compare"); the report puts the results side by side: the task metric and its baseline,
per-class F1, trainable share, delta size, time, memory and forgetting, with plots of the metric
against trainable parameters (and the Pareto front: no other method is both better and smaller),
learning curves and confusion matrices. Plots are inline SVG, so the page needs nothing else.
"""

from __future__ import annotations

import html
import json
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .configure import load_config
from .errors import DeltatuneError, OutputError
from .fs import atomic_write_text, foreign_entries, is_temporary
from .registry_db import main_metric
from .rundir import RunDir

COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
          "#eeca3b", "#17becf"]


def run_compare(base: str | None, overrides: list[str], methods: list[str], folder: Path) -> Path:
    """Train each method (a failure is reported, not fatal) and write ``folder/report.html``. A method whose
    run in ``folder`` already completed is not trained again, so the same command finishes a bake-off that
    was interrupted. Each method trains in a fresh process, so its peak memory is its own. ``folder`` must
    be new, empty or an earlier comparison's: nothing else in it is ever overwritten."""
    check_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    for name in methods:
        run = RunDir(folder / name)
        if run.status() == "completed":  # an interrupted bake-off reruns only what is missing
            print(f"compare: {name}: reusing the completed run in {run.path}", file=sys.stderr)
            results.append(_result(name, run.path))
            continue
        with ProcessPoolExecutor(max_workers=1, mp_context=_fresh_processes()) as pool:
            if run.config.is_file():  # stopped part-way (interrupted, killed): it goes on from its checkpoint
                print(f"compare: {name}: resuming the run in {run.path}", file=sys.stderr)
                error = pool.submit(_resume_one, str(run.path)).result()
            else:
                error = pool.submit(_train_one, base, [*overrides, f"method.name={name}", f"output_dir={run.path}",
                                                       "train.progress=false"]).result()
        if error is None:
            results.append(_result(name, folder / name))
        else:
            print(f"compare: {name} failed: {error}", file=sys.stderr)
            results.append({"method": name, "error": error})
    atomic_write_text(folder / "results.json", json.dumps(results, indent=2))
    report = folder / "report.html"
    atomic_write_text(report, render(results))
    return report


OWN_FILES = ("results.json", "report.html")


def check_folder(folder: Path) -> None:
    """``OutputError`` when ``folder`` holds anything a comparison did not write: its runs (folders with a
    status.json or config.yaml, or empty ones), results.json and report.html are all it may hold."""
    def ours(p: Path) -> bool:
        if is_temporary(p.name):  # what a killed write left
            return True
        if p.is_dir() and not p.is_symlink():  # a method's run (or one killed before it wrote anything)
            return any((p / name).is_file() for name in ("status.json", "config.yaml")) or \
                all(is_temporary(q.name) for q in p.iterdir())
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


def _result(method: str, path: Path) -> dict:
    metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
    log = [json.loads(line) for line in (path / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    delta = sum(f.stat().st_size for f in (path / "delta").rglob("*") if f.is_file())
    return {"method": method, "run": str(path), "metrics": metrics, "delta_bytes": delta,
            "curve": [(r["step"], r["loss"]) for r in log if "loss" in r and r["loss"] is not None],
            "eval_curve": [(r["step"], r["eval"]) for r in log if "eval" in r]}


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


def _table(results: list[dict]) -> str:
    ok = [r for r in results if "metrics" in r]
    if not ok:
        return "<p>No method finished.</p>"
    name, _ = main_metric(ok[0]["metrics"])
    labels = list(ok[0]["metrics"]["eval"].get("per_class", {}))
    head = ["method", name, f"baseline {name}", "macro-F1"] + [f"F1 {x}" for x in labels] + \
           ["trainable", "trainable %", "delta MB", "train s", "peak MB", "forgetting (ppl ratio)"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append(f"<tr><td>{_esc(r['method'])}</td><td colspan='{len(head) - 1}'>failed: {_esc(r['error'])}</td></tr>")
            continue
        m = r["metrics"]
        cells = [r["method"], f"{m['eval'][name]:.4f}", f"{m['baseline'][name]:.4f}",
                 f"{m['eval']['macro_f1']:.4f}" if "macro_f1" in m["eval"] else "-"]
        cells += [f"{m['eval']['per_class'][x]['f1']:.3f}" for x in labels]
        forgetting = m.get("forgetting", {}).get("ratio")
        cells += [f"{m['trainable_params']:,}", f"{100 * m['trainable_params'] / m['total_params']:.3f}",
                  f"{r['delta_bytes'] / 1e6:.2f}", f"{m['train_seconds']:.1f}", f"{m['peak_rss_mb']:.0f}",
                  f"{forgetting:.3f}" if forgetting else "-"]
        rows.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


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


def render(results: list[dict]) -> str:
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;font-size:13px;text-align:right}.cm{display:inline-block;"
             "margin-right:2em;vertical-align:top}")
    body = "".join([f"<h1>deltatune method comparison</h1><p>{len(results)} methods, same data and budget.</p>",
                    _table(results), _scatter(results), _curves(results), _confusions(results)])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>deltatune compare</title>'
            f"<style>{style}</style></head><body>{body}</body></html>\n")
