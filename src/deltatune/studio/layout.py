"""The frame of every studio page and the small HTML pieces pages share. The look is the HTML reports'
(``html_report.STYLE``, the same tables, notes and plots) plus ``static/studio.css`` for the app's chrome.

A page handler returns ``render(request, title, body, active=NAME)``; ``body`` is HTML built with
``html_report`` pieces and the helpers here. Everything that came from a user or a file goes through
``esc`` (``html_report.esc``)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse

from .. import html_report as hr
from ..registry_db import STATUSES

esc = hr.esc
STATUS_WORDS = {"running": "running", "completed": "completed", "failed": "failed", "interrupted": "interrupted",
                "pruned": "pruned", "killed": "stopped (process gone)"}


def render(request: Request, title: str, body: str, *, active: str | None = None,
           meta: list[tuple[str, str]] = (), status: int = 200, lead: str = "") -> HTMLResponse:
    """A whole page: the navigation, ``title`` as its heading, a line of facts (``meta``), ``lead`` (HTML,
    a line under the heading) and ``body``."""
    nav = "".join(f'<a href="{esc(href)}"{" aria-current=page" if name == active else ""}>{esc(label)}</a>'
                  for name, label, href in getattr(request.app.state, "nav", []))
    facts = ("<p class='meta'>" + " ".join(f"<span>{esc(k)}: <b>{esc(v)}</b></span>" for k, v in meta) + "</p>"
             if meta else "")
    csrf = esc(getattr(request.state, "csrf", ""))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)} · deltatune studio</title><meta name='csrf-token' content='{csrf}'>"
            f'<style>{hr.STYLE}</style><link rel="stylesheet" href="/static/studio.css">'
            f'<link rel="icon" href="/static/icon.svg" type="image/svg+xml"></head><body>'
            f'<a class="skip" href="#main">Skip to content</a>'
            f'<header class="top"><a class="brand" href="/">deltatune <span>studio</span></a>'
            f'<nav aria-label="Pages">{nav}</nav></header>'
            f'<main id="main"><h1>{esc(title)}</h1>{facts}{lead}{body}</main>'
            f'<script src="/static/studio.js" defer></script></body></html>')
    return HTMLResponse(page, status_code=status)


def error_page(request: Request, status: int, message: str, todo: str | None = None) -> HTMLResponse:
    """A plain message (never a stack trace) and what to do next."""
    titles = {400: "That request cannot be used", 401: "Token needed", 403: "Not allowed", 404: "Not found",
              413: "Too large", 503: "Busy"}
    title = titles.get(status, "Something went wrong")
    todo = todo or {404: "Go back to the list of runs and pick one from there.",
                    500: "The studio's terminal shows the details. Reload the page; if it happens again, "
                         "report it with what you did."}.get(status, "Go back and try again.")
    message = message[:1].upper() + message[1:]
    body = (f'<div class="problem" role="alert"><p>{esc(message)}</p><p><b>What to do:</b> {esc(todo)}</p></div>'
            '<p><a href="/">Back to the runs</a></p>')
    if not hasattr(request.state, "csrf"):
        request.state.csrf = ""
    return render(request, title, body, status=status)


def csrf_field(request: Request) -> str:
    """The hidden field a POST form needs (``security.Guard`` checks it)."""
    return f'<input type="hidden" name="csrf_token" value="{esc(request.state.csrf)}">'


def post_button(request: Request, action: str, label: str, disabled_why: str | None = None) -> str:
    """A one-button form that POSTs to ``action``; disabled, with the reason beside it, when ``disabled_why``."""
    if disabled_why:
        return (f'<span class="action"><button type="button" disabled>{esc(label)}</button> '
                f'<span class="small">{esc(disabled_why)}</span></span>')
    return (f'<form class="action" method="post" action="{esc(action)}">{csrf_field(request)}'
            f'<button type="submit">{esc(label)}</button></form>')


def badge(status: str) -> str:
    known = status if status in STATUS_WORDS else "unknown"
    return f'<span class="badge {known}" data-status="{esc(status)}">{esc(STATUS_WORDS.get(status, status))}</span>'


def table(head: list[str], rows: list[list[str]], numeric: frozenset[int] | set[int] = frozenset(),
          caption: str = "", attrs: str = "") -> str:
    """A table (cells are ready HTML) in a box that scrolls sideways on a narrow window."""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    th = "".join(f'<th scope="col"{" class=n" if i in numeric else ""}>{h}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<div class="scroll"><table {attrs}>{cap}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def select(name: str, label: str, options: list[tuple[str, str]], selected: str = "", attrs: str = "") -> str:
    """A labelled <select>; ``options``: (value, text)."""
    opts = "".join(f'<option value="{esc(v)}"{" selected" if v == selected else ""}>{esc(t)}</option>'
                   for v, t in options)
    return (f'<label class="field"><span>{esc(label)}</span><select name="{esc(name)}" {attrs}>{opts}</select>'
            "</label>")


def section(title: str, said: str, content: str, anchor: str = "") -> str:
    """A titled section with the line that says what it shows (``said`` is HTML)."""
    ident = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{hr.means(said) if said else ''}{content}</section>"


assert set(STATUSES) <= set(STATUS_WORDS)  # a new registry status needs its words here
