"""The Run page's figures, as inline SVG and tables drawn with the HTML reports' pieces (``html_report``):
learning curves from log.jsonl, metrics before and after training, per class, the confusion matrix."""

from __future__ import annotations

from .. import html_report as hr
from ..report import MAIN
from .layout import esc, table

TRAIN, EVAL, BASE = "#4c78a8", "#f58518", "#888"
MAX_POINTS = 600  # a long run's curve is thinned to this many points (every k-th step)


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    k = -(-len(points) // MAX_POINTS)
    return points[::k] + ([points[-1]] if (len(points) - 1) % k else [])


def series(records: list[dict], metric: str | None) -> dict:
    """From log records: the training objective by step (loss, or reward for the sampling loops), and the
    evaluations' loss and ``metric`` by step."""
    train_key = "loss" if any("loss" in r for r in records) else "reward"
    train = [(r["step"], r[train_key]) for r in records if _num(r.get(train_key)) and "step" in r]
    evals = [(r["step"], r["eval"]) for r in records if isinstance(r.get("eval"), dict) and "step" in r]
    out = {"train_key": train_key, "train": _thin(train),
           "eval_loss": [(s, e["loss"]) for s, e in evals if _num(e.get("loss"))]}
    if metric and metric != "loss":
        out["metric"] = [(s, e[metric]) for s, e in evals if _num(e.get(metric))]
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _line(frame: hr.Frame, points, color: str, name: str, width: float = 1.5, dots: bool = False) -> str:
    if not points:
        return ""
    coords = " ".join(f"{frame.px(s):.1f},{frame.py(v):.1f}" for s, v in points)
    out = (f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="{width}">'
           f"<title>{esc(name)}</title></polyline>")
    if dots:
        out += "".join(f'<circle cx="{frame.px(s):.1f}" cy="{frame.py(v):.1f}" r="3" fill="{color}">'
                       f"<title>{esc(name)} at step {s:,}: {hr.sig(v, 4)}</title></circle>" for s, v in points)
    return out


def chart(title: str, lines: list[tuple[str, str, list, bool]], ytitle: str, hline: tuple[str, float] | None = None,
          w: int = 520, h: int = 300) -> str:
    """Lines (name, colour, points, with dots) against optimizer steps; ``hline``: a dashed reference value."""
    points = [p for _, _, pts, _ in lines for p in pts]
    if not points:
        return ""
    ys = [v for _, v in points] + ([hline[1]] if hline else [])
    last = max(s for s, _ in points) or 1
    low, high = min(ys), max(ys)
    pad = 0.05 * ((high - low) or abs(high) or 1)
    frame = hr.Frame(w, h, hr.value_ticks(0, last, 6, integer=True), hr.value_ticks(low - pad, high + pad, 5),
                     "optimizer step", ytitle, xrange=(0, last))
    parts = [frame.open(title)]
    if hline:
        y = frame.py(hline[1])
        parts.append(f'<line x1="{frame.left}" y1="{y:.1f}" x2="{frame.right}" y2="{y:.1f}" stroke="{BASE}" '
                     f'stroke-dasharray="5 4"><title>{esc(hline[0])}: {hr.sig(hline[1], 4)}</title></line>')
    parts += [_line(frame, pts, color, name, dots=dots) for name, color, pts, dots in lines]
    legend = [(name, color) for name, color, pts, _ in lines if pts] + ([(hline[0], BASE)] if hline else [])
    return f"<figure><figcaption>{esc(title)}</figcaption>{''.join(parts)}</svg>{hr.legend(legend)}</figure>"


def curves(records: list[dict], metric: str | None, baseline: dict | None) -> str:
    """The learning curves: the training objective and evaluation loss by step, and the main metric by step
    against the untouched model's (dashed)."""
    s = series(records, metric)
    if not s["train"] and not s["eval_loss"]:
        return '<p class="none">No steps logged yet: the curves appear once training logs its first step.</p>'
    word = "training loss" if s["train_key"] == "loss" else "mean reward"
    figs = [chart(f"{word.capitalize()} by step", [(f"{word} (one batch)", TRAIN, s["train"], False),
                                                  ("evaluation loss", EVAL, s["eval_loss"], True)],
                  "loss" if s["train_key"] == "loss" else "reward")]
    if s.get("metric"):
        base = (baseline or {}).get(metric)
        figs.append(chart(f"Evaluation {metric} by step", [(metric, EVAL, s["metric"], True)], metric,
                          hline=("untouched model", base) if _num(base) else None))
    last = s["train"][-1][0] if s["train"] else s["eval_loss"][-1][0]
    return f'<div class="figs" data-last-step="{last}">' + "".join(f"<div>{f}</div>" for f in figs if f) + "</div>"


def before_after(metrics: dict) -> str:
    """The headline metrics of the untouched and the tuned model, with the change."""
    ev, base = metrics.get("eval") or {}, metrics.get("baseline") or {}
    keys = [k for k in MAIN if _num(ev.get(k))] + sorted(k for k, v in ev.items() if _num(v) and k not in MAIN)
    if not keys:
        return '<p class="none">No metrics recorded.</p>'
    rows = []
    for k in keys:
        before = base.get(k) if _num(base.get(k)) else None
        change = "" if before is None else f"{ev[k] - before:+.4f}"
        rows.append([esc(k), "–" if before is None else f"{before:.4f}", f"<b>{ev[k]:.4f}</b>", change])
    return table(["metric", "before (untouched model)", "after (tuned)", "change"], rows, {1, 2, 3})


def per_class(metrics: dict) -> str:
    per, before = (metrics.get("eval") or {}).get("per_class"), (metrics.get("baseline") or {}).get("per_class") or {}
    if not isinstance(per, dict) or not per:
        return ""
    rows = [[esc(name), *(f"{f.get(k, 0):.3f}" for k in ("precision", "recall", "f1")),
             f"{(before.get(name) or {}).get('f1', 0):.3f}" if before else "–", hr.count(f.get("support", 0))]
            for name, f in per.items()]
    return table(["class", "precision", "recall", "F1 (tuned)", "F1 before", "support (examples)"], rows,
                 {1, 2, 3, 4, 5})


def confusion(metrics: dict, limit: int = 20) -> str:
    ev = metrics.get("eval") or {}
    matrix, labels = ev.get("confusion_matrix"), list(ev.get("per_class") or {})
    if not matrix or len(labels) != len(matrix):
        return ""
    if len(labels) > limit:
        return f'<p class="none">{len(labels)} classes: too many to draw; metrics.json holds the matrix.</p>'
    top = max(max(row) for row in matrix) or 1
    head = "".join(f'<th scope="col">{esc(x)}</th>' for x in labels)
    body = "".join(f'<tr><th scope="row">{esc(labels[i])}</th>' + "".join(
        f'<td class="n" style="background:rgba(76,120,168,{v / top:.2f});color:{"#fff" if v / top > 0.55 else "#222"}">'
        f'{"<b>" if i == j else ""}{hr.count(v)}{"</b>" if i == j else ""}</td>' for j, v in enumerate(row)) + "</tr>"
                   for i, row in enumerate(matrix))
    return (f'<div class="scroll"><table class="cm"><thead><tr><th scope="col">true \\ predicted</th>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table></div>")
