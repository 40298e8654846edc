"""Runs: the run registry as a table, filtered by status / model / method / task / kind, searched, sorted;
the statuses of running runs update live, and new runs are announced."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request

from ... import html_report as hr
from ... import registry_db as db
from .. import live
from ..layout import badge, esc, render, select, table
from ..runinfo import status_of
from . import Page

router = APIRouter()
PAGE = Page("runs", router, ("Runs", "/"))
PAGE_SIZE = 1000
FILTERS = ("status", "kind", "model", "method", "task")
SORTS = {"newest": ("newest first", lambda r: r["started"] or "", True),
         "oldest": ("oldest first", lambda r: r["started"] or "", False),
         "metric": ("main metric, highest first", lambda r: (r["main_value"] is not None, r["main_value"] or 0), True),
         "trainable": ("trainable parameters, fewest first",
                       lambda r: (r["trainable_params"] is None, r["trainable_params"] or 0), False),
         "time": ("train time, shortest first", lambda r: (r["train_seconds"] is None, r["train_seconds"] or 0), False),
         "status": ("status", lambda r: r["status"], False)}
SEARCHED = ("id", "kind", "status", "model", "method", "task", "path", "error", "main_metric")


def model_name(model: str | None) -> str:
    model = model or ""
    return Path(model).name if "/" in model else model


def _matches(run: dict, chosen: dict[str, str], words: list[str]) -> bool:
    for key, value in chosen.items():
        if value and (model_name(run["model"]) if key == "model" else run[key] or "") != value:
            return False
    text = " ".join(str(run.get(k) or "") for k in SEARCHED).lower()
    return all(w in text for w in words)


def select_runs(runs: list[dict], chosen: dict[str, str], q: str, sort: str) -> list[dict]:
    words = q.lower().split()
    picked = [r for r in runs if _matches(r, chosen, words)]
    _, key, reverse = SORTS.get(sort, SORTS["newest"])
    return sorted(picked, key=key, reverse=reverse)


def _filters(runs: list[dict], chosen: dict[str, str], q: str, sort: str) -> str:
    fields = []
    for key in FILTERS:
        values = sorted({(model_name(r["model"]) if key == "model" else r[key]) or "" for r in runs} - {""})
        fields.append(select(key, key.capitalize(), [("", f"any {key}")] + [(v, v) for v in values], chosen[key]))
    fields.append(select("sort", "Sort by", [(k, v[0]) for k, v in SORTS.items()], sort))
    return ('<form class="filters" method="get" action="/" role="search">'
            f'<label class="field grow"><span>Search</span><input type="search" name="q" value="{esc(q)}" '
            'placeholder="id, model, method, folder, error..."></label>' + "".join(fields) +
            '<button type="submit">Apply</button> <a class="small" href="/">Clear</a></form>')


def _row(run: dict) -> list[str]:
    status = status_of(run) if run["status"] == "running" else run["status"]
    share = (hr.percent(run["trainable_params"], run["total_params"])
             if run["trainable_params"] is not None and run["total_params"] else "")
    value = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    return [f'<input type="checkbox" name="id" value="{esc(run["id"])}" aria-label="compare run {esc(run["id"])}">',
            f'<a href="/runs/{esc(run["id"])}"><code>{esc(run["id"])}</code></a>',
            f'<span data-run="{esc(run["id"])}"{" data-live" if status == "running" else ""}>{badge(status)}</span>',
            esc(run["kind"]), esc(model_name(run["model"])), esc(run["method"] or ""), esc(run["task"] or ""),
            esc(run["main_metric"] or ""), value(run["main_value"]), value(run["baseline_value"]), share,
            "" if run["train_seconds"] is None else f"{run['train_seconds']:,.1f}", esc(hr.when(run["started"]))]


HEAD = ["<span class='sr'>select</span>", "run", "status", "kind", "model", "method", "task", "metric", "tuned",
        "untouched", "trainable", "train time (s)", "started"]


@router.get("/")
def runs_page(request: Request, q: str = "", sort: str = "newest", page: int = 1, status: str = "", kind: str = "",
              model: str = "", method: str = "", task: str = ""):
    chosen = {"status": status, "kind": kind, "model": model, "method": method, "task": task}
    runs = db.list_runs()
    shown = select_runs(runs, chosen, q, sort)
    page = max(1, page)
    rows = [_row(r) for r in shown[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]]
    newest = runs[0]["id"] if runs else ""
    if not runs:
        body = ('<div class="empty"><p>No runs recorded yet in the run registry.</p><p>Train one, e.g. '
                "<code>deltatune train configs/minilm/classification-lora.yaml</code>, and it appears here "
                "while it trains.</p></div>")
    else:
        said = (f"{hr.count(len(shown))} of {hr.plural(len(runs), 'run')}"
                + (f"; showing {hr.count((page - 1) * PAGE_SIZE + 1)}–{hr.count(min(len(shown), page * PAGE_SIZE))}"
                   if len(shown) > PAGE_SIZE else "")
                + ". <i>tuned</i> and <i>untouched</i>: the run's main metric on its evaluation split after "
                  "training and for the model before it; <i>trainable</i>: the share of the model's parameters trained. "
                  "Tick two or more runs to compare them.")
        body = (_filters(runs, chosen, q, sort) + hr.means(said) + _pages(request, len(shown), page)
                + f'<form method="get" action="/compare" id="runs-form" data-newest="{esc(newest)}">'
                '<p class="live-note" hidden role="status"></p>'
                + table(HEAD, rows, {8, 9, 10, 11}, attrs='id="runs" class="runs"')
                + '<button type="submit" class="primary">Compare selected runs</button></form>')
    return render(request, "Runs", body, active="runs", meta=[("Registry", str(db.registry_path()))])


def _pages(request: Request, total: int, page: int) -> str:
    if total <= PAGE_SIZE:
        return ""
    last = -(-total // PAGE_SIZE)
    links = []
    for n in range(1, last + 1):
        params = {**request.query_params, "page": str(n)}
        href = "/?" + "&".join(f"{esc(k)}={esc(v)}" for k, v in params.items())
        links.append(f"<b>{n}</b>" if n == page else f'<a href="{href}">{n}</a>')
    return f'<nav class="pager" aria-label="Pages of runs">Page {" ".join(links)}</nav>'


@router.get("/events/runs")
def runs_events(request: Request, ids: str = "", newest: str = ""):
    """Events: ``status`` {id, status, html} when a watched run's status changes; ``newer`` {count} when
    runs were recorded after the page's newest."""
    watched = [i for i in ids.split(",") if i][:200]

    async def events():
        last: dict[str, str] = {}
        async for _ in live.ticks(request):
            for run_id in watched:
                try:
                    run = await live.to_thread(db.get, run_id, False)
                except Exception:  # gone from the registry, or the registry is busy: try again next tick
                    continue
                status = status_of(run)
                if last.setdefault(run_id, "running") != status:
                    last[run_id] = status
                    yield live.event("status", {"id": run_id, "status": status, "html": badge(status)})
            recent = await live.to_thread(db.list_runs, None, None, None, None, None, None, 50)
            ids_now = [r["id"] for r in recent]
            if newest and ids_now and ids_now[0] != newest:
                yield live.event("newer", {"count": ids_now.index(newest) if newest in ids_now else len(ids_now)})
            else:
                yield ": waiting\n\n"

    return live.stream(request, events)
