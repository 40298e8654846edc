"""Run: one run's status (a failed run: its error and what to do), export and resume, metrics before and
after, cost, learning curves that update live while it trains, per-class figures, confusion matrix, samples
(or a button that asks for held-out answers), its data report and its config. Parts that change (``/runs/ID/part/NAME``) are re-fetched by the page's
script when the run's event stream (``/runs/ID/events``: log.jsonl and status.json) says so."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ... import html_report as hr
from ... import registry_db as db
from .. import figures, live
from ..jobs import Busy
from ..layout import badge, esc, render, section
from ..run_parts import SAMPLE_COUNT, actions, data_summary, samples_part, status_box, tracking
from ..runinfo import delta_bytes, find, read_json, read_log, read_log_from, read_text, samples, status_of
from ..security import form_value
from . import Page
from .runs import model_name

router = APIRouter()
PAGE = Page("run", router, None)
EXPORT_FORMATS = ("delta", "hf", "gguf", "gguf-lora", "onnx")
STOPPED = ("failed", "interrupted", "killed")


def metrics_of(folder: Path) -> dict:
    """metrics.json, or while a run trains what it has: the untouched model's figures (baseline.json)."""
    metrics = read_json(folder, "metrics.json")
    if not metrics:
        metrics = {"baseline": read_json(folder, "baseline.json")}
    return metrics


def metric_name(run: dict, metrics: dict, records: list[dict]) -> str:
    if run.get("main_metric"):
        return run["main_metric"]
    if "main_metric" in metrics:
        return db.main_metric(metrics)[0]
    evals = [r["eval"] for r in records if isinstance(r.get("eval"), dict)]
    return db.main_metric({"eval": evals[-1] if evals else metrics.get("baseline") or {}})[0]


def curves_part(run: dict) -> tuple[str, int]:
    folder = Path(run["path"])
    records, offset = read_log(folder)
    metrics = metrics_of(folder)
    return figures.curves(records, metric_name(run, metrics, records), metrics.get("baseline")), offset


def _cost(run: dict, metrics: dict) -> str:
    trainable, total = metrics.get("trainable_params"), metrics.get("total_params")
    size = delta_bytes(run)
    rows = [("Trainable parameters", "trainable_params",
             f"{hr.count(trainable)} ({hr.percent(trainable, total)} of {hr.count(total)})" if trainable else None),
            ("Delta size on disk", "delta/", hr.size(size) if size else None),
            ("Training time", "train_seconds", f"{metrics['train_seconds']:,.1f} s" if "train_seconds" in metrics else None),
            ("Throughput", "tokens_per_s", f"{metrics['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in metrics else None),
            ("Optimizer steps", "steps", metrics.get("steps")),
            ("Peak memory (RSS)", "peak_rss_mb", f"{metrics['peak_rss_mb']:,.0f} MB" if "peak_rss_mb" in metrics else None)]
    shown = [r for r in rows if r[2] is not None]
    return hr.facts(shown) if shown else '<p class="none">Not known until the run completes.</p>'


def _samples(request: Request, run: dict, status: str) -> str:
    part = samples_part(request, run, status)
    if not part:
        return ""
    return section("Samples", "What the base model and the tuned one answer to a few held-out examples (with the "
                   "reference answer from the data, when the run's task has one).",
                   f'<div data-part="samples">{part}</div>', anchor="samples")


def _results(run: dict, metrics: dict, status: str) -> str:
    if status != "completed" and not metrics.get("eval"):
        return ""
    name = run["main_metric"] or db.main_metric(metrics)[0]
    said = (f"The untouched model and the tuned one on the same evaluation split. <b>{esc(name)}</b> judges the "
            f"run ({'higher' if db.main_metric(metrics)[1] else 'lower'} is better).")
    pair = section("Before and after training", said, figures.before_after(metrics)) + section(
        "What it cost", "Parameters trained, what the run saves, time and memory on this machine.", _cost(run, metrics))
    out = f'<div class="cols">{pair}</div>'
    classes = ""
    if figures.per_class(metrics):
        classes += section("Per class", "Precision, recall and F1 of the tuned model per class on the evaluation "
                           "split; support: how many evaluation examples have the class.", figures.per_class(metrics))
    if figures.confusion(metrics):
        classes += section("Confusion matrix", "Rows are the true classes, columns the predicted ones (tuned model, "
                           "evaluation split): the diagonal counts correct predictions, darker cells hold more "
                           "examples.", figures.confusion(metrics))
    out += f'<div class="cols">{classes}</div>' if classes else ""
    return out


@router.get("/runs/{run_id}")
def run_page(request: Request, run_id: str):
    run = find(run_id)
    folder, status = Path(run["path"]), status_of(run)
    metrics = metrics_of(folder)
    curves, offset = curves_part(run)
    config = read_text(folder, "config.yaml")
    body = [f'<div id="run-live" data-run="{esc(run["id"])}" data-offset="{offset}" '
            f'data-status="{esc(status)}"></div>',
            f'<div data-part="status">{status_box(request, run, status)}</div>',
            _results(run, metrics, status),
            section("Learning curves", "Training loss at every logged step (one batch: noisy, read the trend) and "
                    "the evaluations on the held-out split; they update while the run trains.",
                    f'<div data-part="curves" aria-live="off">{curves}</div>', anchor="curves"),
            _samples(request, run, status), data_summary(run), tracking(run),
            section("Export and resume", "", f'<div data-part="actions">{actions(request, run, status)}</div>',
                    anchor="actions"),
            section("Configuration", "The resolved config the run trained with (config.yaml).",
                    f"<details><summary>Show config.yaml</summary><pre>{esc(config)}</pre></details>")
            if config else ""]
    meta = [("Kind", run["kind"]), ("Model", model_name(run["model"])),
            ("Method", run["method"] or "–"), ("Task", run["task"] or "–"), ("Started", hr.when(run["started"])),
            ("Folder", run["path"])]
    return render(request, f"Run {run['id']}", "".join(body), active="runs", meta=meta)


@router.get("/runs/{run_id}/part/{name}")
def run_part(request: Request, run_id: str, name: str):
    run = find(run_id)
    status = status_of(run)
    parts = {"curves": lambda: curves_part(run)[0], "status": lambda: status_box(request, run, status),
             "actions": lambda: actions(request, run, status), "samples": lambda: samples_part(request, run, status)}
    if name not in parts:
        raise HTTPException(404, f"no part {name[:40]!r} of a run page")
    return HTMLResponse(parts[name](), headers={"Cache-Control": "no-store"})


@router.get("/runs/{run_id}/data-report")
def data_report(run_id: str):
    """The run's own data_report.html (written by deltatune, self-contained, no scripts)."""
    text = read_text(Path(find(run_id)["path"]), "data_report.html", limit=20_000_000)
    if text is None:
        raise HTTPException(404, "this run has no data report (data_report.html)")
    return HTMLResponse(text)


@router.get("/runs/{run_id}/events")
def run_events(request: Request, run_id: str, offset: int = 0, shown: str = ""):
    """Events: ``log`` {records, offset} as log.jsonl grows, ``status`` {status, html} when it differs from the
    status the page shows (``shown``: it may have changed between the page and this request, e.g. a short run
    completing), ``jobs`` when a command started for the run changes state, ``end`` once nothing more will change."""
    run = find(run_id)
    folder, jobs = Path(run["path"]), request.app.state.jobs

    async def events():
        nonlocal offset
        status, states = shown or status_of(run), None
        async for _ in live.ticks(request):
            records, offset = await live.to_thread(read_log_from, folder, max(0, offset))
            if records:
                yield live.event("log", {"records": records[-50:], "offset": offset})
            now = status_of(await live.to_thread(db.get, run["id"], False))
            if now != status:
                status = now
                yield live.event("status", {"status": now, "html": badge(now)})
            job_states = [j.state for j in jobs.for_run(run["id"])]
            if job_states != states:
                if states is not None:
                    yield live.event("jobs", {"states": job_states})
                states = job_states
            if status != "running" and "running" not in job_states and not records:
                yield live.event("end", {"status": status})
                return
            if not records:
                yield ": waiting\n\n"

    return live.stream(request, events)


@router.post("/runs/{run_id}/export")
def export_run(request: Request, run_id: str):
    run = find(run_id)
    fmt = form_value(request, "format", "delta")
    if fmt not in EXPORT_FORMATS:
        raise HTTPException(400, f"format {fmt[:20]!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if status_of(run) != "completed":
        raise HTTPException(400, "only a completed run can be exported")
    argv = ["export", run["path"], "--format", fmt] + (["--force"] if form_value(request, "force") else [])
    return _start(request, run, "export", argv)


@router.post("/runs/{run_id}/resume")
def resume_run(request: Request, run_id: str):
    run = find(run_id)
    if status_of(run) not in STOPPED or run["kind"] not in db.OWN_DIR:
        raise HTTPException(400, "only a training run that failed, was interrupted or killed can be resumed")
    return _start(request, run, "resume", ["train", "--resume", run["path"]])


@router.post("/runs/{run_id}/samples")
def sample_run(request: Request, run_id: str):
    """``deltatune eval RUN --samples 5``: the base and tuned models' answers on held-out examples."""
    run = find(run_id)
    if status_of(run) != "completed":
        raise HTTPException(400, "only a completed run can answer held-out examples")
    if samples(Path(run["path"])):
        raise HTTPException(400, "this run already has samples (samples.jsonl); they are shown on its page")
    return _start(request, run, "samples", ["eval", run["path"], "--samples", str(SAMPLE_COUNT)], "samples")


def _start(request: Request, run: dict, kind: str, argv: list[str], anchor: str = "actions"):
    try:
        request.app.state.jobs.start(kind, argv, run["id"])
    except Busy as exc:
        raise HTTPException(503, str(exc)) from None
    return RedirectResponse(f"/runs/{run['id']}#{anchor}", status_code=303)

