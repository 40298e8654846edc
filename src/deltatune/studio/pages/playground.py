"""Playground: chat with a base model and one or two runs trained on it, side by side, each answer streamed
as it is written. The studio serves them with ``deltatune serve``'s engine (``chatting.Playground``): the base
once, the runs' deltas switched per request."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Request

from ... import html_report as hr
from ...errors import DeltatuneError
from ...serve.types import Sampling
from .. import live
from ..chatting import Playground
from ..layout import esc, render, select
from ..runinfo import find
from ..security import _bounded_body
from ..textmodels import run_choice, text_runs, writing_tasks
from . import Page, shared
from .runs import model_name

log = logging.getLogger("deltatune.studio")
router = APIRouter()
PAGE = Page("playground", router, ("Playground", "/playground"))
ASSETS = '<link rel="stylesheet" href="/static/playground.css"><script src="/static/playground.js" defer></script>'
MAX_MESSAGES = 40
MAX_TOKENS = 256


def playground(request: Request) -> Playground:
    return shared(request, "playground", Playground)


def _picker(runs: list[dict], first: str, second: str, base: bool) -> str:
    options = [(r["id"], run_choice(r).label) for r in runs]
    return ('<form class="filters" method="get" action="/playground">'
            + select("run", "Run", options, first)
            + select("run2", "Second run (optional)", [("", "none")] + options, second)
            + select("base", "Also the base model", [("1", "yes, in the first column"), ("0", "no")],
                     "1" if base else "0")
            + '<button type="submit" class="primary">Open these</button></form>')


def _column(key: str, title: str, facts: str) -> str:
    return (f'<section class="pg-col" data-model="{esc(key)}" aria-label="{esc(title)}"><h2>{esc(title)}</h2>'
            f'<p class="small">{facts}</p><div class="pg-log" role="log" aria-live="polite" tabindex="0" '
            f'aria-label="{esc(title)}: conversation"></div></section>')


def _columns(runs: list[dict], base: bool) -> str:
    cols = []
    if base:
        first = runs[0]
        cols.append(_column(f"base:{first['id']}", f"Base model: {model_name(first['model'])}",
                            "no delta: the model every run here started from"))
    for run in runs:
        cols.append(_column(f"run:{run['id']}", f"Run {run['id']}",
                            f"{esc(run['task'])} · {esc(run['method'] or 'full')} on "
                            f"{esc(model_name(run['model']))} · "
                            f'<a href="/runs/{esc(run["id"])}">its page</a>'))
    return f'<div class="pg-cols n{len(cols)}">{"".join(cols)}</div>'


def _composer() -> str:
    return ('<form class="pg-send" autocomplete="off"><label class="field grow"><span>Your message (Enter sends, '
            'Shift+Enter starts a new line)</span><textarea name="message" rows="2" required maxlength="4000">'
            '</textarea></label><div class="pg-options"><label class="field"><span>Most new tokens</span>'
            f'<input type="number" name="max_tokens" value="48" min="1" max="{MAX_TOKENS}"></label>'
            '<label class="field"><span>Temperature (0: the likeliest word)</span><input type="number" '
            'name="temperature" value="0" min="0" max="2" step="0.1"></label>'
            '<button type="submit" class="primary">Send</button><button type="button" data-clear>Clear the chat'
            '</button></div><p class="small" role="status" data-note></p></form>')


LEAD = hr.means("Ask the base model and runs trained on it the same thing and read their answers side by side, "
                "written as they come. Each column keeps its own conversation; nothing is saved.")


@router.get("/playground")
def playground_page(request: Request, run: str = "", run2: str = "", base: str = "1"):
    runs = text_runs()
    if not runs:
        body = ('<div class="empty"><p>No completed run that writes text yet. Train one (task causal_lm, dpo, kto, '
                '...) from the New run page or with <code>deltatune train</code>; it appears here when it '
                "completes.</p></div>")
        return render(request, "Playground", body, active="playground", lead=LEAD)
    chosen = [find(run)] if run else [runs[0]]
    if run2 and run2 != chosen[0]["id"]:
        chosen.append(find(run2))
    picker = _picker(runs, chosen[0]["id"], run2, base != "0")
    body = picker + f'<div id="playground">{_composer()}{_columns(chosen, base != "0")}</div>' + ASSETS
    return render(request, "Playground", body, active="playground", lead=LEAD)


# ----------------------------------------------------------------------------- the streamed answer

def _sampling(body: dict) -> Sampling:
    max_tokens, temperature = body.get("max_tokens", 48), body.get("temperature", 0)
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise HTTPException(400, f"max_tokens: give a whole number from 1 to {MAX_TOKENS}")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise HTTPException(400, "temperature: give a number from 0 to 2")
    return Sampling(max_tokens=max_tokens, temperature=float(temperature), top_p=1.0, seed=0)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES or not all(
            isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
            for m in messages):
        raise HTTPException(400, f"messages: give 1 to {MAX_MESSAGES} messages, each a role (user or assistant) "
                                 "and its text")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _target(key: str) -> tuple[dict, bool]:
    kind, _, run_id = key.partition(":")
    if kind not in ("run", "base"):
        raise HTTPException(400, "model: run:ID or base:ID, as the page sends it")
    run = find(run_id)
    if run["status"] != "completed" or run["task"] not in writing_tasks():
        raise HTTPException(400, f"run {run['id']} is not a completed run that writes text")
    return run, kind == "base"


@router.post("/playground/chat")
async def chat(request: Request):
    """Server-sent events: ``loading`` while the model loads, ``text`` {text} as the answer grows, then ``done``,
    or ``error`` {message} (a run the engine cannot serve says why)."""
    raw = await _bounded_body(request, request.app.state.settings.max_form_bytes)
    try:
        body = json.loads(raw)
    except ValueError:
        raise HTTPException(400, "the request is not JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the request is not a JSON object")
    sampling, messages = _sampling(body), _messages(body)
    run, base = await live.to_thread(_target, str(body.get("model", ""))[:80])
    engine = playground(request)

    async def events():
        pieces = 0
        try:
            yield live.event("loading", {})
            name = await engine.name_for(run, base)
            async for text in engine.chat(name, messages, sampling):
                pieces += 1
                yield live.event("text", {"text": text})
            yield live.event("done", {"pieces": pieces})
        except DeltatuneError as exc:
            yield live.event("error", {"message": f"{'The base model' if base else 'This run'} cannot answer here: "
                                                  f"{exc}"})
        except Exception:  # a bug: the terminal gets the trace, the page a plain line
            log.exception("studio playground: answering with %s failed", run["id"])
            yield live.event("error", {"message": "The studio could not answer; its terminal shows why."})

    return live.stream(request, events)
