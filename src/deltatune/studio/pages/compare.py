"""Compare: runs side by side, the best highlighted; the main metric against trainable parameters with the Pareto
front, learning curves overlaid and confusion matrices: the figures of ``deltatune compare``'s report
(``compare.report``), drawn by its own functions for any runs picked from the registry."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Query, Request

from ... import html_report as hr
from ... import registry_db as db
from ...compare.report import COLORS, confusions, curves, scatter
from ..figures import series
from ..layout import badge, esc, render, section, table
from ..runinfo import RUN_ID, find, read_json, read_log
from . import Page
from .runs import model_name

router = APIRouter()
PAGE = Page("compare", router, ("Compare", "/compare"))
MAX_RUNS = 12
ROWS = ("kind", "model", "method", "task", "status", "accuracy", "macro_f1", "perplexity", "trainable", "delta MB",
        "train s", "peak MB", "fingerprint", "started")
LABELS = {"train s": "train time (s)", "peak MB": "peak memory (MB)", "delta MB": "delta size (MB)",
          "macro_f1": "macro-F1", "fingerprint": "data fingerprint"}


def label(run: dict) -> str:
    return f"{run['method'] or run['kind']} {run['id'][:6]}"


def _picker(chosen: list[str]) -> str:
    runs = [r for r in db.list_runs(limit=500) if r["status"] == "completed"]
    if len(runs) < 2:
        return '<p class="empty">Two completed runs are needed to compare; the registry has fewer.</p>'
    rows = [[f'<input type="checkbox" name="id" value="{esc(r["id"])}"{" checked" if r["id"] in chosen else ""} '
             f'aria-label="run {esc(r["id"])}">', f'<code>{esc(r["id"])}</code>', esc(model_name(r["model"])),
             esc(r["method"] or ""), esc(r["task"] or ""), esc(r["main_metric"] or ""),
             "" if r["main_value"] is None else f"{r['main_value']:.4f}", esc(hr.when(r["started"]))] for r in runs]
    return ('<form method="get" action="/compare" class="picker">'
            + table(["<span class='sr'>pick</span>", "run", "model", "method", "task", "metric", "tuned", "started"],
                    rows, {6}) + '<button type="submit" class="primary">Compare</button></form>')


def _table(runs: list[dict]) -> str:
    summaries, best = [db.summary(r) for r in runs], db.best_index(runs)
    metric = runs[best]["main_metric"] if best is not None else None
    head = ["<span class='sr'>field</span>"] + [f'<a href="/runs/{esc(r["id"])}"><code>{esc(r["id"])}</code></a>'
                                               for r in runs]
    rows = []
    for key in [k for k in ROWS if any(s.get(k) for s in summaries)]:
        cells = [badge(r["status"]) if key == "status" else esc(s.get(key, "")) for r, s in zip(runs, summaries)]
        if key == metric:
            cells[best] = f'<span class="best">{cells[best]} <span class="tag">best</span></span>'
        rows.append([f"<b>{esc(LABELS.get(key, key))}</b>"] + cells)
    warn = "" if len({r["data_fingerprint"] for r in runs}) == 1 else hr.banner(
        "The data fingerprints differ: these runs did not train and evaluate on the same rows, so their metrics "
        "are not directly comparable.")
    said = (f"The best {esc(metric)} is marked <span class='tag'>best</span>; the untouched model's score is in "
            "brackets." if metric else "These runs do not share a main metric, so none is marked best.")
    return warn + section("Side by side", said, table(head, rows, set(range(1, len(runs) + 1))))


def _flat(runs: list[dict]) -> list[dict]:
    """Each run as compare.report's plotting functions take a method: its metrics and its loss curve."""
    out = []
    for run in runs:
        folder = Path(run["path"])
        metrics = read_json(folder, "metrics.json")
        records, _ = read_log(folder)
        curve = series(records, None)["train"] if records else []
        entry = {"method": label(run), "curve": curve if series(records, None)["train_key"] == "loss" else []}
        if metrics.get("eval") and metrics.get("trainable_params"):
            entry["metrics"] = metrics
        out.append(entry)
    return out


def _figures(runs: list[dict]) -> str:
    flat = _flat(runs)
    colors = {e["method"]: COLORS[i % len(COLORS)] for i, e in enumerate(flat)}
    scored = [e for e in flat if "metrics" in e]
    name = db.main_metric(scored[0]["metrics"])[0] if scored else None
    same = [e for e in scored if name in e["metrics"]["eval"]]
    parts = [scatter(same, colors) if len(same) >= 2 else "", curves(flat, colors), confusions(same)]
    return "".join(parts)


@router.get("/compare")
def compare_page(request: Request, id: list[str] = Query(default=[])):
    chosen = list(dict.fromkeys(i for i in id if RUN_ID.fullmatch(i)))[:MAX_RUNS]
    if len(chosen) < 2:
        lead = hr.means("Pick two or more runs to see them side by side: their metrics with the best highlighted, "
                        "the metric against trainable parameters with the Pareto front, and their learning curves.")
        return render(request, "Compare runs", _picker(chosen), active="compare", lead=lead)
    runs = [find(i) for i in chosen]
    body = _table(runs) + _figures(runs) + "<h2>Change the selection</h2>" + _picker(chosen)
    return render(request, "Compare runs", body, active="compare", meta=[("Runs", str(len(runs)))])
