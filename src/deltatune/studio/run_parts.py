"""The Run page's parts that change while a person looks at it: the status box (a failed run's error and what
to do), the export and resume actions with the commands they started, the samples (answers before and after
training, or the button that asks for them), the data summary and where the run's trackers (train.report_to) wrote."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request

from .. import html_report as hr
from .. import registry_db as db
from ..errors import DeltatuneError
from ..tasks import registry as tasks
from ..train.tracking import tracking_locations
from .layout import badge, csrf_field, esc, post_button, section, select, table
from .runinfo import read_json, samples

SAMPLE_COUNT = 5  # held-out examples the Run page's button asks answers for

EXPORT_CHOICES = [("delta", "delta: the adapter alone (small)"), ("hf", "hf: a merged Hugging Face model"),
                  ("gguf", "gguf: merged, for llama.cpp / Ollama"), ("gguf-lora", "gguf-lora: a LoRA for llama.cpp"),
                  ("onnx", "onnx: an encoder for onnxruntime")]
RESUMABLE = ("failed", "interrupted", "killed")
WHAT_TO_DO = {
    "failed": "The message says what went wrong and usually what to change. If the cause is fixed (memory freed, a "
              "file restored), resume the run: it continues from its last checkpoint. If a setting was wrong, start "
              "a new run with the changed setting.",
    "killed": "The process that trained this run is gone (it was killed, or the machine restarted) though the run "
              "still says it is training. Resume it: it continues from its last checkpoint, and the result equals "
              "an uninterrupted run.",
    "interrupted": "The run was stopped before the end (Ctrl-C or a stop request). Resume it: it continues from its "
                   "last checkpoint.",
}


def _headline(run: dict) -> str:
    name, tuned, base = run["main_metric"], run["main_value"], run["baseline_value"]
    if name is None or tuned is None:
        return "Completed."
    change = f" → <b>{tuned:.4f}</b> ({tuned - base:+.4f})" if base is not None else f" <b>{tuned:.4f}</b>"
    text = f"Completed: {esc(name)} {'' if base is None else f'{base:.4f}'}{change} on the evaluation split"
    if run["trainable_params"] and run["total_params"]:
        text += f", training {hr.percent(run['trainable_params'], run['total_params'])} of the parameters"
    if run["train_seconds"] is not None:
        text += f" in {run['train_seconds']:,.1f} s"
    return text + "."


def status_box(request: Request, run: dict, status: str) -> str:
    head = f'<p class="status-line">Status: <span data-status-badge>{badge(status)}</span></p>'
    if status == "completed":
        return head + f'<div class="done"><p>{_headline(run)}</p></div>'
    if status == "running":
        return head + ('<div class="note" role="status"><p>Training. The learning curves below update as the run '
                       'logs its steps; its results appear here when it completes.</p></div>')
    if status == "pruned":
        return head + ('<div class="note"><p>The tuner stopped this trial early: its evaluations were behind the '
                       "other trials'. Nothing to do.</p></div>")
    error = run.get("error") or read_json(Path(run["path"]), "status.json").get("error")
    shown = f'<pre class="error">{esc(error)}</pre>' if error else ""
    todo = WHAT_TO_DO.get(status, "")
    button = post_button(request, f"/runs/{run['id']}/resume", "Resume this run") if status in RESUMABLE and \
        run["kind"] in db.OWN_DIR else ""
    return head + (f'<div class="problem" role="alert"><p><b>This run {"failed" if status == "failed" else "stopped"}'
                   f'.</b></p>{shown}<p><b>What to do:</b> {esc(todo)}</p>{button}'
                   f'<p class="small">From a terminal: <code>deltatune train --resume {esc(run["path"])}</code></p></div>')


def actions(request: Request, run: dict, status: str) -> str:
    if status == "completed":
        export = (f'<form class="action" method="post" action="/runs/{esc(run["id"])}/export">{csrf_field(request)}'
                  + select("format", "Format", EXPORT_CHOICES, "delta")
                  + '<label class="check"><input type="checkbox" name="force" value="1"> replace an earlier export'
                  '</label><button type="submit">Export</button></form>'
                  f'<p class="small">The same as <code>deltatune export {esc(run["path"])} --format FORMAT</code>; '
                  "each export is checked by the runtime that will load it (docs/export.md).</p>")
    else:
        export = post_button(request, "", "Export", disabled_why="a run can be exported once it has completed")
    if status in RESUMABLE and run["kind"] in db.OWN_DIR:
        resume = post_button(request, f"/runs/{run['id']}/resume", "Resume")
    else:
        resume = post_button(request, "", "Resume", disabled_why="nothing to resume: " + (
            "the run completed" if status == "completed" else f"the run is {status}"))
    return f'<div class="actions">{export}{resume}</div>{_jobs(request, run)}'


def _jobs(request: Request, run: dict) -> str:
    jobs = request.app.state.jobs.for_run(run["id"])
    if not jobs:
        return ""
    items = []
    for job in jobs:
        started = time.strftime("%H:%M:%S", time.localtime(job.started))
        items.append(f'<details{" open" if job.exit_code is None else ""}><summary>{esc(job.kind)} started {started}: '
                     f'<b>{esc(job.state)}</b></summary><pre class="output" tabindex="0">{esc(job.output()) or "(no output yet)"}'
                     "</pre></details>")
    return "<h3>Commands started here</h3>" + "".join(items)


def samples_part(request: Request, run: dict, status: str) -> str:
    """The run's samples.jsonl as a table (with the reference answer when the rows have one), or for a completed
    run without it the button that starts ``deltatune eval RUN --samples 5``; "" when there is nothing to show."""
    rows = samples(Path(run["path"]))
    if rows:
        return _samples_table(rows)
    if status != "completed" or not answers_held_out(run):
        return ""
    label = f"Show answers on {SAMPLE_COUNT} held-out examples"
    command = f'<p class="small">The same as <code>deltatune eval {esc(run["path"])} --samples {SAMPLE_COUNT}</code>.</p>'
    if any(j.kind == "samples" and j.exit_code is None for j in request.app.state.jobs.for_run(run["id"])):
        return post_button(request, "", label, disabled_why="answering now: the table appears here when it is done") \
            + command
    note = ('<p>No samples yet. The base model and the tuned one can answer the first examples of the run\'s '
            "evaluation split (made again from its data files; the models are loaded, which takes a while).</p>")
    failed = [j for j in request.app.state.jobs.for_run(run["id"]) if j.kind == "samples" and j.exit_code]
    if failed:
        note += '<p class="small">The last attempt failed; its message is under "Commands started here" below.</p>'
    return note + post_button(request, f"/runs/{run['id']}/samples", label) + command


def answers_held_out(run: dict) -> bool:
    """Whether the run's task has held-out inputs with reference answers (``Task.answers_held_out``)."""
    try:
        return bool(run.get("task")) and tasks.get(run["task"]).answers_held_out
    except DeltatuneError:  # a task this version does not know
        return False


def _samples_table(rows: list[dict]) -> str:
    reference = any("reference" in r for r in rows)
    head = ["input", *(["reference"] if reference else []), "before (base model)", "after (tuned)"]
    cells = [[esc(_first(r.get("prompt"))), *([esc(_first(r.get("reference")))] if reference else []),
              esc(_first(r.get("before"))), esc(_first(r.get("after")))] for r in rows]
    return table(head, cells)


def _first(value) -> str:
    return str(value[0] if isinstance(value, list) and value else value if value is not None else "")


def data_summary(run: dict) -> str:
    report = read_json(Path(run["path"]), "data_report.json")
    if not report:
        return ""
    leaks = sum(sum(k.values()) for k in (report.get("leakage_found") or {}).values())
    pii = sum((report.get("pii_redacted") or {}).values())
    split = ", ".join(f"{hr.count(n)} {s}" for s, n in (report.get("rows_per_split") or {}).items() if n)
    rows = [("Rows read", "rows_in", report.get("rows_in")), ("Rows kept, per split", "rows_per_split", split or None),
            ("Exact duplicates dropped", "exact_duplicates_removed", report.get("exact_duplicates_removed")),
            ("Near duplicates dropped", "near_duplicates_removed", report.get("near_duplicates_removed")),
            ("Eval/test rows repeating a training row", "leakage_found", leaks),
            ("Personal data items redacted", "pii_redacted", pii),
            ("Labels in train", "label_counts.train", (report.get("label_counts") or {}).get("train"))]
    said = (f"What the data pipeline did before training. <a href=\"/runs/{esc(run['id'])}/data-report\">The full "
            "data report</a> has the label balance, token lengths and examples of leaks.")
    return section("Data", said, hr.facts([r for r in rows if r[2] is not None]))


TRACKER_NAMES = {"tensorboard": "TensorBoard", "mlflow": "MLflow"}


def tracking(run: dict) -> str:
    """Where the run's trackers wrote and the command that opens each (nothing for a run without them)."""
    found = tracking_locations(run["path"])
    if not found:
        return ""
    rows = [[esc(TRACKER_NAMES.get(name, name)), f"<code>{esc(entry['path'])}</code>", f"<code>{esc(entry['open'])}</code>"]
            for name, entry in found.items()]
    said = ("The run's log, config and final metrics, also written for the trackers named in "
            "<code>train.report_to</code>, inside the run folder; open them with the command beside each.")
    return section("Tracking", said, table(["tracker", "where", "open with"], rows))
