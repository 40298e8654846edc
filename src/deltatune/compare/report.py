"""The comparison as one self-contained HTML page: the verdict, the quality and cost tables, the rate
search, metric against trainable parameters with the Pareto front, learning curves, confusion matrices.
Plots are inline SVG, so the page needs nothing else."""

from __future__ import annotations

import html
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from .. import html_report as hr
from ..registry_db import main_metric
from .analysis import _finished, _mean_of, pareto, train_seconds

if TYPE_CHECKING:
    from . import Budget

COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
          "#eeca3b", "#17becf"]


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


def scatter(results: list[dict], colors: dict, w: int = 640, h: int = 360) -> str:
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


def curves(results: list[dict], colors: dict, w: int = 640, h: int = 320) -> str:
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


def confusions(results: list[dict]) -> str:
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
                    _searches(results), scatter(flat, colors), curves(flat, colors), confusions(flat)])
    style = ("table th,table td{text-align:right}table td{white-space:nowrap}table th.l,table td.l{text-align:left;"
             "white-space:normal}.t{white-space:nowrap}.cm{display:inline-block;margin-right:2em;vertical-align:top}")
    return hr.page("deltatune method comparison", meta, body, style)
