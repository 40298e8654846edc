"""New run: a form generated from the config dataclasses (newrun_form), Check (the config validated as `deltatune
validate` does, with the same messages next to the fields, and `deltatune plan`'s memory and time prediction)
and Launch (`deltatune train` in the background, then the run's own page with its live curves). A run started
here can be cancelled from its page: Ctrl-C for its command, so it ends as interrupted and can resume."""

from __future__ import annotations

import shlex
import subprocess

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ... import html_report as hr
from ...configure import config_warnings, load_config
from ...errors import ConfigError, DeltatuneError
from ...methods import registry as methods
from ...tasks import registry as tasks
from ...train.progress import duration
from .. import launch as runs_here
from .. import newrun_form as nf
from ..jobs import Busy
from ..layout import csrf_field, esc, post_button, render
from ..runinfo import find, status_of
from . import Page

router = APIRouter()
PAGE = Page("newrun", router, ("New run", "/new"))
PRIMARY = {"data": ("data.train", "data.eval", "data.text_column", "data.label_column", "data.prompt_column",
                    "data.response_column"),
           "train": ("train.epochs", "train.max_steps", "train.lr", "train.batch_size", "train.max_length",
                     "train.eval_every")}
CANCEL_WAIT = 30.0  # seconds a cancel waits for the run to stop (a checkpoint being written finishes first)
TASK_SECTIONS = ("reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo")  # each read by the task of that name only
LEAD = ("Choose a model, a task, a method and the data. <b>Check</b> validates the settings (the same messages as "
        "<code>deltatune validate</code>) and predicts memory and time per step (<code>deltatune plan</code>); "
        "<b>Launch</b> starts training in the background and opens the run's page, where its curves grow live.")


def _choices(request: Request) -> dict[str, list[tuple[str, str]]]:
    root = request.app.state.settings.data_root
    return {"model": runs_here.model_choices(root),
            "task": [(n, f"{n}: {tasks.get(n).summary}") for n in tasks.names()],
            "method.name": [(n, f"{n}: {methods.get(n).summary}") for n in methods.names()],
            "data.train": runs_here.data_choices(root),
            "data.eval": runs_here.data_choices(root, "none: hold out a share of the training data"),
            "data.test": runs_here.data_choices(root, "none (or a share of the training data)")}


def _form_body(request: Request, values: dict[str, str], errors: dict[str, list[str]]) -> str:
    fields, choices = nf.config_fields(), _choices(request)
    method, task = values["method.name"], values["task"]
    by_key = {f.key: f for f in fields}

    def group(keys) -> str:
        return nf.grid([by_key[k] for k in keys], values, errors, choices)

    def rest(prefix: str, skip=()) -> list[nf.Field]:
        return [f for f in fields if f.key.startswith(prefix) and f.key not in skip and f.key.count(".") == 1]

    def more(title: str, parts: str, names: list[str]) -> str:
        opened = " open" if any(n in errors for n in names) else ""
        return f'<details class="nr-more"{opened}><summary>{esc(title)}</summary>{parts}</details>'

    def sub(legend: str, items: list[nf.Field], attrs: str = "") -> str:
        return (f'<fieldset class="nr-sub" {attrs}><legend>{esc(legend)}</legend>'
                f'{nf.grid(items, values, errors, choices)}</fieldset>')

    options = _method_options(values, errors, method)
    data_more = rest("data.", PRIMARY["data"])
    data_subs = [(title, [f for f in fields if f.key.startswith(f"data.{part}.")])
                 for part, title in (("clean", "Cleaning"), ("dedup", "Duplicates and leakage"),
                                     ("pii", "Personal data"), ("augment", "Augmentation"))]
    train_more = rest("train.", PRIMARY["train"])
    task_parts = [(name, rest(f"{name}.")) for name in TASK_SECTIONS]
    sections = [
        ("Model and task", "What to tune and what it learns.", group(("model", "task", "name"))),
        ("Method", "How the model is adapted: what trains and what stays frozen. The chosen method's options "
                   "follow.", group(("method.name",)) + options),
        ("Data", "A file under the data root or a packaged data set, and the columns the task reads.",
         group(PRIMARY["data"]) + more("More data settings", nf.grid(data_more, values, errors, choices)
                                       + "".join(sub(t, items) for t, items in data_subs),
                                       [f.name for f in data_more + [x for _, i in data_subs for x in i]])),
        ("Training", "How long and how fast it trains.",
         group(PRIMARY["train"]) + more("More training settings", nf.grid(train_more, values, errors, choices),
                                        [f.name for f in train_more])),
        ("Evaluation and task settings", "Read only by the task named in each part.",
         more("More settings", sub("Evaluation", rest("eval.")) + "".join(
             sub(f"Task {name}", items, nf.when("task", name, task)) for name, items in task_parts),
             [f.name for f in rest("eval.") + [x for _, i in task_parts for x in i]]))]
    return "".join(f'<fieldset class="nr-section"><legend>{esc(title)}</legend><p class="nr-said">{said}</p>'
                   f"{content}</fieldset>" for title, said, content in sections)


def _method_options(values: dict[str, str], errors: dict[str, list[str]], chosen: str) -> str:
    """Every method's options, each shown only while it is the chosen method (studio.js follows the select)."""
    parts = []
    for name in methods.names():
        fields = nf.method_fields(name)
        inner = nf.grid(fields, values, errors, {}) if fields else f'<p class="none">{esc(name)} has no options.</p>'
        parts.append(f'<div class="nr-options" {nf.when("method.name", name, chosen)}>{inner}</div>')
    return "".join(parts)


def _values(request: Request, form: dict[str, str] | None) -> dict[str, str]:
    """The form's values: what was posted, else the defaults."""
    values = {f.name: nf.show(f.default) for f in nf.config_fields()}
    for name in methods.names():
        values.update({f.name: nf.show(f.default) for f in nf.method_fields(name)})
    values.update({k: v for k, v in (form or {}).items() if k in values})
    values["method.name"] = values["method.name"] if values["method.name"] in methods.names() else "lora"
    choices = _choices(request)["data.train"]
    if not form and choices:  # a first look: the first file offered, so Check works at once
        values["data.train"] = choices[0][0]
    return values


def _page(request: Request, values: dict[str, str], result: str = "",
          problems: list[tuple[str, str]] = (), status: int = 200) -> HTMLResponse:
    errors: dict[str, list[str]] = {}
    for name, message in problems:
        if name:
            errors.setdefault(name, []).append(message)
    form = (f'<form method="post" action="/new" class="nr-form" novalidate>{csrf_field(request)}'
            f"{_form_body(request, values, errors)}"
            '<div class="nr-buttons"><button type="submit" name="action" value="check">Check</button>'
            '<button type="submit" name="action" value="launch" class="primary">Launch</button>'
            '<span class="small">Check: validate and predict memory and time. Launch: validate and start '
            "training.</span></div></form>")
    return render(request, "New run", _summary(problems) + result + form, active="newrun", lead=hr.means(LEAD),
                  status=status)


def _summary(problems: list[tuple[str, str]]) -> str:
    if not problems:
        return ""
    items = "".join(f'<li>{f"<a href=#{nf.ident(n)}>" if n else ""}{esc(m)}'
                    f'{"</a>" if n else ""}</li>' for n, m in problems)
    return (f'<div class="problem nr-problems" role="alert" id="problems"><p><b>{hr.plural(len(problems), "problem")} '
            "with these settings</b> (the messages <code>deltatune validate</code> gives; each is also shown at its "
            f"field):</p><ul>{items}</ul><p><b>What to do:</b> change the values named, then Check again.</p></div>")


def _posted(request: Request) -> dict[str, str]:
    return {k: v[0] for k, v in getattr(request.state, "form", {}).items() if v}


def _validate(request: Request, form: dict[str, str]):
    """(config or None, overrides, problems as (field name, message))."""
    root = request.app.state.settings.data_root
    method = form.get("method.name", "lora")
    fields = nf.config_fields() + (nf.method_fields(method) if method in methods.names() else [])
    refs = {"model": runs_here.model_ref(root, form.get("model", "")),
            **{f"data.{k}": runs_here.data_ref(root, form.get(f"data.{k}", ""), f"data.{k}")
               for k in ("train", "eval", "test")}}
    good, problems = nf.problems_of(nf.overrides(form, fields, refs))
    try:
        cfg = load_config(None, good)
    except ConfigError as exc:
        return None, good, problems + nf.place(exc.problems, fields, method)
    return (cfg if not problems else None), good, problems


@router.get("/new")
def new_run(request: Request):
    return _page(request, _values(request, None))


@router.post("/new")
def check_or_launch(request: Request):
    form = _posted(request)
    values = _values(request, form)
    cfg, overrides, problems = _validate(request, form)
    if cfg is None:
        return _page(request, values, problems=problems, status=400)
    if form.get("action") == "launch":
        return _launch(request, cfg)
    return _page(request, values, _checked(cfg, overrides))


def _checked(cfg, overrides: list[str]) -> str:
    warnings = "".join(f"<p>Warning: {esc(w)}</p>" for w in config_warnings(cfg))
    command = "deltatune train " + " ".join(shlex.quote(o) for o in overrides)
    try:
        prediction = _plan(runs_here.predict(cfg))
    except DeltatuneError as exc:
        said = "; ".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
        prediction = f'<div class="note"><p>No prediction for this run: {esc(said)}</p></div>'
    return (f'<section class="nr-checked" id="checked" aria-labelledby="checked-h"><h2 id="checked-h">Checked: '
            f'ready to launch</h2><div class="done" role="status"><p>The settings are valid.</p>{warnings}</div>'
            f"{prediction}<p class='small'>The same run from a terminal: <code>{esc(command)}</code></p></section>")


def _plan(p) -> str:
    verdict = "fits" if p.fits else "does NOT fit"
    rows = [("Peak memory", "peak_mb", f"{p.peak_mb:,.0f} MB of {p.available_mb:,.0f} MB available now: {verdict}"),
            ("Time per optimizer step", "seconds_per_step",
             f"{hr.sig(p.seconds_per_step, 2)} s" if p.seconds_per_step >= 0.001 else "under a millisecond"),
            ("Optimizer steps", "steps", p.steps),
            ("Training time", None, f"{_about(p.seconds_per_step * p.steps)} (evaluations not included)"),
            ("Trainable parameters", "trainable_params",
             f"{hr.count(p.trainable_params)} of {hr.count(p.total_params)} "
             f"({hr.percent(p.trainable_params, p.total_params)})"),
            ("Batches", None, f"{p.batch_size} examples, padded to {p.mean_width:.0f} tokens on average, "
                              f"{p.max_width} at most")]
    terms = "".join(f"<tr><th>{esc(k)}</th><td class=n>{v:,.1f}</td></tr>" for k, v in p.memory_mb.items())
    tips = "".join(f"<li><code>{esc(' '.join(s.change))}</code>: peak {s.peak_mb:,.0f} MB, "
                   f"{s.seconds_per_step:.2f} s per step ({esc(s.why)})</li>" for s in p.suggestions)
    return ('<h3>Prediction</h3><p class="means">What <code>deltatune plan</code> predicts for this machine, before '
            "any training: the peak resident memory and the seconds per optimizer step.</p>"
            f'<div class="cols"><div>{hr.facts(rows)}</div><details><summary>Memory by term (MB)</summary>'
            f"<table>{terms}</table></details></div>"
            + (f'<div class="problem"><p>It will not fit. Each change below on its own:</p><ul>{tips}</ul></div>'
               if tips else ""))


def _about(seconds: float) -> str:
    return "under a second" if seconds < 1 else f"about {duration(seconds)}"


def _launch(request: Request, cfg):
    jobs, runs = request.app.state.jobs, request.app.state.settings.runs
    try:
        job, folder = runs_here.launch(jobs, runs, cfg)
    except Busy as exc:
        raise HTTPException(503, str(exc)) from None
    _launched(request)[str(folder.resolve())] = job.id
    return RedirectResponse(f"/new/started/{job.id}", status_code=303)


def _launched(request: Request) -> dict[str, str]:
    """Run folder -> the command launched here that trains it."""
    state = request.app.state
    if not hasattr(state, "launched"):
        state.launched = {}
    return state.launched


@router.get("/new/started/{job_id}")
def started(request: Request, job_id: str):
    """While the command prepares the data and loads the model (before the run is recorded), then its page."""
    job = request.app.state.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no command {job_id[:20]!r} was started by this studio")
    run = runs_here.run_of(job)
    if run is not None:
        return RedirectResponse(f"/runs/{run['id']}", status_code=303)
    if job.exit_code is None:
        body = ('<div class="note" role="status"><p>Starting: checking the data, preparing it and loading the model. '
                "The run's page opens as soon as training starts.</p></div>"
                f'<pre class="output">{esc(job.output()) or "(no output yet)"}</pre>')
        page = render(request, "Starting the run", body, active="newrun", meta=[("Folder", str(runs_here.output_of(job)))])
        page.headers["Refresh"] = "1"
        return page
    body = (f'<div class="problem" role="alert"><p><b>The run did not start</b> ({esc(job.state)}).</p>'
            f'<pre class="error">{esc(job.output())}</pre><p><b>What to do:</b> the last lines say what went wrong; '
            'go back, change the settings named and launch again.</p></div><p><a href="/new">Back to New run</a></p>')
    return render(request, "The run did not start", body, active="newrun", status=200)


@router.post("/runs/{run_id}/cancel")
def cancel(request: Request, run_id: str):
    run = find(run_id)
    job = runs_here.training_job(request.app.state.jobs, _launched(request), run)
    if job is None or status_of(run) != "running":
        raise HTTPException(400, "only a run this studio started and that is still training can be cancelled "
                                 "here; a run started in a terminal stops with Ctrl-C there")
    request.app.state.jobs.cancel(job.id)
    try:  # the run records itself as interrupted as it stops: the page then shows it so
        job.process.wait(timeout=CANCEL_WAIT)
    except subprocess.TimeoutExpired:
        pass
    return RedirectResponse(f"/runs/{run['id']}", status_code=303)


@router.get("/runs/{run_id}/cancel-form")
def cancel_form(request: Request, run_id: str):
    """The Cancel button for the Run page (its script asks while the run trains); empty when there is none."""
    run = find(run_id)
    job = runs_here.training_job(request.app.state.jobs, _launched(request), run)
    html = ""
    if job is not None and status_of(run) == "running":
        html = (post_button(request, f"/runs/{run['id']}/cancel", "Cancel the run")
                + '<span class="small">Stops training as Ctrl-C does: the run ends as interrupted, keeps its last '
                  "checkpoint, and can resume.</span>")
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})
