"""Feedback: the human-feedback loop in the browser. Choose a prompts file under the data root, a model that
writes text and how to judge (pick the best of k responses, rank them, or thumbs up/down for KTO); then each
prompt shows its sampled responses, and every answer is appended to a JSONL file under the data root as it is
given: the rows ``deltatune feedback`` writes, which reward models, DPO, PPO (and KTO, thumbs) train on.
Starting the same session again goes on where the file stops."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ... import html_report as hr
from ...assets import DATA_SUFFIXES
from ...errors import DeltatuneError
from .. import live
from ..datafiles import data_files
from ..labeling import MODES, Labeling, Labelings, Setup
from ..layout import csrf_field, esc, render, section, select
from ..security import confined, form_value
from ..textmodels import choices, resolve
from . import Page, shared

router = APIRouter()
PAGE = Page("feedback", router, ("Feedback", "/feedback"))
ASSETS = '<link rel="stylesheet" href="/static/feedback.css"><script src="/static/feedback.js" defer></script>'
LIMITS = {"k": (2, 4, int), "max_new_tokens": (1, 256, int), "temperature": (0.05, 2.0, float),
          "top_p": (0.05, 1.0, float), "seed": (0, 2**31 - 1, int)}
DEFAULTS = {"k": "2", "max_new_tokens": "48", "temperature": "0.8", "top_p": "0.95", "seed": "0"}
TRAIN = {"thumbs": "task=kto", "pick": "task=dpo (or reward, then ppo)", "rank": "task=dpo (or reward, then ppo)"}


def labelings(request: Request) -> Labelings:
    return shared(request, "labelings", Labelings)


# ----------------------------------------------------------------------------- the setup form

def _number(form: dict, name: str, problems: list[str]):
    low, high, kind = LIMITS[name]
    text = form.get(name, DEFAULTS[name]).strip()
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        problems.append(f"{name.replace('_', ' ')}: give a {'whole ' if kind is int else ''}number from {low} to "
                        f"{high}, not {text[:20]!r}")
        return kind(DEFAULTS[name])
    return value


def _paths(request: Request, form: dict, mode: str, problems: list[str]) -> tuple[Path, Path] | None:
    root = request.app.state.settings.data_root
    prompts = confined(root, form.get("prompts", ""), "prompts file")
    if not prompts.is_file() or prompts.suffix.lower() not in DATA_SUFFIXES:
        problems.append(f"prompts file {form.get('prompts', '')[:80]!r}: choose a data file under {root} from the list")
        return None
    out_name = form.get("out", "").strip() or f"feedback/{prompts.stem}-{mode}.jsonl"
    out = confined(root, out_name, "output file")
    if out.suffix.lower() != ".jsonl" or out == prompts or out.is_dir():
        problems.append(f"output file {out_name[:80]!r}: give a new or earlier .jsonl file under {root} (not the "
                        "prompts file)")
        return None
    return prompts, out


def setup_from(request: Request, form: dict) -> tuple[Setup | None, list[str]]:
    """The session the form asks for, or the problems with it (all of them at once)."""
    problems: list[str] = []
    mode = form.get("mode", "pick")
    if mode not in MODES:
        problems.append(f"mode {mode[:20]!r}: choose one of {', '.join(MODES)}")
        mode = "pick"
    numbers = {name: _number(form, name, problems) for name in LIMITS}
    column = form.get("column", "prompt").strip() or "prompt"
    paths = _paths(request, form, mode, problems)
    try:
        model = resolve(form.get("model", ""))
    except HTTPException as exc:
        problems.append(exc.detail)
    if problems or paths is None:
        return None, problems
    root = request.app.state.settings.data_root
    k = 1 if mode == "thumbs" else numbers.pop("k")
    numbers.pop("k", None)
    return Setup(paths[0], str(paths[0].relative_to(root)), column, model, paths[1], str(paths[1].relative_to(root)),
                 mode, k, **numbers), []


def _form(request: Request, form: dict) -> str:
    root = request.app.state.settings.data_root
    files = data_files(root)
    models = choices()
    if not files or not models:
        return _nothing_yet(root, files, models)
    mode = form.get("mode", "pick")
    radios = "".join(f'<label class="fb-mode"><input type="radio" name="mode" value="{k}"'
                     f'{" checked" if k == mode else ""}> {esc(v)}</label>' for k, v in MODES.items())
    numbers = "".join(f'<label class="field"><span>{esc(label)}</span><input type="number" name="{name}" '
                      f'value="{esc(form.get(name, DEFAULTS[name]))}" min="{LIMITS[name][0]}" max="{LIMITS[name][1]}" '
                      f'step="{1 if LIMITS[name][2] is int else 0.05}"></label>'
                      for name, label in (("max_new_tokens", "Most new tokens"), ("temperature", "Temperature"),
                                          ("top_p", "Top p"), ("seed", "Seed")))
    return (f'<form class="filters fb-setup" method="post" action="/feedback/start">{csrf_field(request)}'
            + select("prompts", "Prompts file", [(f, f) for f in files], form.get("prompts", ""))
            + f'<label class="field"><span>Prompt column</span><input name="column" value="'
              f'{esc(form.get("column", "prompt"))}"></label>'
            + select("model", "Model that writes the responses", [(c.key, c.label) for c in models],
                     form.get("model", ""))
            + f'<fieldset class="fb-modes"><legend>How you judge</legend>{radios}</fieldset>'
            + f'<label class="field"><span>Responses per prompt (not for thumbs)</span><input type="number" name="k" '
              f'value="{esc(form.get("k", "2"))}" min="2" max="4"></label>'
            + f'<label class="field grow"><span>Output file (.jsonl)</span><input name="out" '
              f'value="{esc(form.get("out", ""))}" placeholder="feedback/PROMPTS-MODE.jsonl"></label>'
            + f'<details class="fb-sampling"><summary>Sampling settings</summary><div class="fb-row">{numbers}</div>'
              '</details><button type="submit" class="primary">Start labeling</button>'
              f'<p class="small fb-where">Files are read and written under the data root, {esc(root)}. An empty '
              "output file name means feedback/PROMPTS-MODE.jsonl; a file an earlier session wrote is continued."
              "</p></form>")


def _nothing_yet(root: Path, files: list[str], models: list) -> str:
    need = []
    if not files:
        need.append(f"a prompts file under {esc(root)} (a .jsonl, .csv, .tsv, .json or .parquet file with a "
                    "<code>prompt</code> column; the Data page uploads one)")
    if not models:
        need.append("a completed run that writes text (task causal_lm, dpo, kto, ...) in the run registry, or the "
                    "packaged SmolLM2 model (<code>deltatune assets prepare</code>)")
    items = "".join(f"<li>{n}</li>" for n in need)
    return f'<div class="empty"><p>To collect feedback the studio needs:</p><ul>{items}</ul></div>'


def _sessions(request: Request) -> str:
    rows = [f'<li><a href="/feedback/s/{s.id}">{esc(s.setup.out_name)}</a>: {esc(MODES[s.setup.mode])}, '
            f'{s.answered + s.skipped} of {s.total} prompts done ({esc(s.state)})</li>'
            for s in labelings(request).all()]
    return section("Sessions", "Labeling sessions since the studio started; each goes on where it stopped.",
                   f"<ul>{''.join(rows)}</ul>") if rows else ""


LEAD = hr.means("Sample responses to your prompts and say which is better (or rank them, or give a thumbs up or "
                "down). Every answer is saved at once in the JSONL file that <code>deltatune feedback</code> writes "
                "and that reward models, DPO and PPO (thumbs: KTO) train on; start the same session again to go on "
                "where you stopped.")


@router.get("/feedback")
def feedback_page(request: Request):
    form = {k: v for k, v in request.query_params.items()}
    return render(request, "Feedback", _form(request, form) + _sessions(request) + ASSETS, active="feedback",
                  lead=LEAD)


@router.post("/feedback/start")
def start(request: Request):
    form = {k: v[0] for k, v in request.state.form.items()}
    setup, problems = setup_from(request, form)
    if setup is not None:
        try:
            session = labelings(request).start(setup)
        except DeltatuneError as exc:
            problems = [str(exc)]
        else:
            return RedirectResponse(f"/feedback/s/{session.id}", status_code=303)
    box = ('<div class="problem" role="alert"><p>The session cannot start:</p><ul>'
           + "".join(f"<li>{esc(p)}</li>" for p in problems) + "</ul><p><b>What to do:</b> change what the list "
           "names and start again.</p></div>")
    return render(request, "Feedback", box + _form(request, form) + ASSETS, active="feedback", lead=LEAD, status=400)


# ----------------------------------------------------------------------------- a session

def _progress(s: Labeling) -> str:
    done = s.answered + s.skipped
    return (f'<p class="fb-progress"><progress max="{s.total}" value="{done}" aria-label="prompts done"></progress> '
            f'<span><b>{done}</b> of {s.total} prompts done · {s.answered} answered · {s.skipped} skipped · '
            f'{s.total - done} left</span></p>')


def _waiting(s: Labeling) -> str:
    prompt = s.current
    if s.state == "loading":
        what = f"Loading {esc(s.setup.model.label)}; the first responses follow."
    else:
        what = (f"Sampling {s.setup.k} response{'s' if s.setup.k > 1 else ''} to prompt {prompt.index + 1} "
                f"(row {prompt.row}).")
    return (f'<div class="note fb-wait" role="status"><p><span class="fb-spin" aria-hidden="true"></span>{what}</p>'
            '<p class="small">Sampling runs on this machine\'s CPU and takes a few seconds per prompt; the page '
            "updates by itself.</p></div>")


def _done(s: Labeling) -> str:
    link = f'/data?file={quote(s.setup.out_name)}'
    return (f'<div class="done" role="status"><p><b>All {s.total} prompts are done</b>: {s.answered} answered, '
            f'{s.skipped} skipped.</p><p>The rows are in <a href="{link}">{esc(s.setup.out_name)}</a>; skipped '
            f'prompts in {esc(s.setup.out_name[:-6])}.skipped.jsonl. Train on them with <code>deltatune train '
            f'{esc(TRAIN[s.setup.mode])} data.train={esc(s.setup.out_name)}</code>.</p></div>')


def _failed(s: Labeling) -> str:
    return (f'<div class="problem" role="alert"><p>{esc(s.error)}</p><p><b>What to do:</b> start the session again '
            'from the <a href="/feedback">Feedback page</a> (it goes on where the file stops), or choose another '
            "model.</p></div>")


def _card(number: int, text: str, button: str = "") -> str:
    return (f'<h3 id="r{number}">Response {number}</h3><div class="fb-text">{esc(text)}</div>{button}')


def _controls(s: Labeling, responses: list[str]) -> str:
    n = len(responses)
    if s.setup.thumbs:
        cards = f'<article class="fb-card" aria-labelledby="r1">{_card(1, responses[0])}</article>'
        keys = (_key("u", "Thumbs up: a good response", "primary") + _key("d", "Thumbs down: a bad response", "primary")
                + _key("s", "Skip"))
        return f'<div class="fb-grid one">{cards}</div><div class="fb-more">{keys}</div>'
    if s.setup.mode == "rank":
        items = "".join(f'<li class="fb-card" draggable="true" tabindex="0" data-n="{i}" aria-labelledby="r{i}">'
                        f'<span class="fb-place" aria-hidden="true"></span>{_card(i, r)}<span class="fb-move">'
                        f'<button type="button" data-move="-1" aria-label="Move response {i} up">Up</button>'
                        f'<button type="button" data-move="1" aria-label="Move response {i} down">Down</button></span>'
                        "</li>" for i, r in enumerate(responses, start=1))
        order = " ".join(str(i) for i in range(1, n + 1))
        return (f'<ol class="fb-ranking" aria-label="Responses, best first">{items}</ol><div class="fb-more">'
                f'<label class="field"><span>Ranking, best first (response numbers)</span><input name="answer" '
                f'value="{order}" class="fb-order" autocomplete="off"></label>'
                f'<button type="submit" class="primary" name="choice" value="">Save this ranking <kbd>Enter</kbd>'
                f'</button>{_key("t", "Tie or all bad")}{_key("s", "Skip")}</div>')
    cards = "".join(f'<article class="fb-card" aria-labelledby="r{i}">'
                    f'{_card(i, r, _key(str(i), f"Response {i} is best", "primary"))}</article>'
                    for i, r in enumerate(responses, start=1))
    more = _key("t", "Tie or all bad") + _key("s", "Skip")
    return f'<div class="fb-grid">{cards}</div><div class="fb-more">{more}</div>'


def _key(key: str, label: str, kind: str = "") -> str:
    return (f'<button type="submit" name="choice" value="{key}" data-key="{key}" class="{kind}">{esc(label)} '
            f'<kbd aria-hidden="true">{key}</kbd></button>')


KEYS = {"pick": "Keys: 1 to {n} pick the best response, t a tie (or all bad), s skip.",
        "rank": "Drag the responses into order, best at the top, or use Up and Down; keys: type the response numbers "
                "best first, Enter saves, t a tie (or all bad), s skip.",
        "thumbs": "Keys: u thumbs up, d thumbs down, s skip."}


def _ready(request: Request, s: Labeling) -> str:
    prompt = s.current
    responses = s.responses[prompt.index]
    keys = KEYS[s.setup.mode].format(n=len(responses))
    return (f'<section class="fb-prompt" aria-labelledby="prompt-h"><h2 id="prompt-h">Prompt {prompt.index + 1} of '
            f'{s.total}</h2><p class="small">row {prompt.row} of {esc(s.setup.prompts_name)}</p>'
            f'<div class="fb-text">{esc(prompt.text)}</div></section>'
            f'<form method="post" action="/feedback/s/{s.id}/answer" class="fb-answer" data-mode="{s.setup.mode}">'
            f'{csrf_field(request)}<input type="hidden" name="index" value="{prompt.index}">'
            f'{_controls(s, responses)}</form><p class="small fb-keys">{esc(keys)}</p>')


def session_part(request: Request, s: Labeling) -> str:
    with s.cv:
        state = s.state
        body = {"ready": lambda: _ready(request, s), "done": lambda: _done(s), "failed": lambda: _failed(s)}.get(
            state, lambda: _waiting(s))()
        return (f'<div id="labeling" data-session="{s.id}" data-state="{state}" data-version="{s.version}">'
                f'{_progress(s)}{esc(s.note) and f"<p class=small>{esc(s.note)}</p>"}{body}</div>')


@router.get("/feedback/s/{session_id}")
def session_page(request: Request, session_id: str):
    s = labelings(request).get(session_id)
    meta = [("Prompts", s.setup.prompts_name), ("Model", s.setup.model.label), ("Judging", MODES[s.setup.mode]),
            ("Writing to", s.setup.out_name)]
    return render(request, "Feedback", session_part(request, s) + ASSETS, active="feedback", meta=meta)


@router.get("/feedback/s/{session_id}/part")
def session_fragment(request: Request, session_id: str):
    return HTMLResponse(session_part(request, labelings(request).get(session_id)),
                        headers={"Cache-Control": "no-store"})


@router.post("/feedback/s/{session_id}/answer")
def answer(request: Request, session_id: str):
    s = labelings(request).get(session_id)
    index = form_value(request, "index")
    if not index.isdigit():
        raise HTTPException(400, "the answer names no prompt; reload the page")
    s.answer(int(index), form_value(request, "choice") or form_value(request, "answer"))
    return RedirectResponse(f"/feedback/s/{s.id}", status_code=303)


@router.get("/feedback/s/{session_id}/events")
def session_events(request: Request, session_id: str, version: int = -1):
    """``state`` {state, version} whenever the session changes; it ends once the prompt on screen is ready."""
    s = labelings(request).get(session_id)

    async def events():
        seen = version
        async for _ in live.ticks(request):
            if s.version != seen:
                seen = s.version
                yield live.event("state", {"state": s.state, "version": seen})
            if s.state in ("ready", "done", "failed"):
                return
            yield ": waiting\n\n"

    return live.stream(request, events)
