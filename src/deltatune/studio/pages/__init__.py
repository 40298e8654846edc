"""The studio's pages. A page is one module here that defines ``PAGE = Page(...)``: its FastAPI router
(the routes it answers, GET pages and any POST actions) and, if it belongs in the navigation, its label
and address. Registering it is one line: its module name in ``PAGE_MODULES`` (in navigation order)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from fastapi import APIRouter, Request

PAGE_MODULES = ("runs", "newrun", "compare", "data", "feedback", "playground", "run")


@dataclass(frozen=True)
class Page:
    name: str                      # what ``layout.render(..., active=name)`` marks in the navigation
    router: APIRouter
    nav: tuple[str, str] | None    # (label, address) in the navigation bar; None: reached by links only


def pages() -> list[Page]:
    return [import_module(f"{__name__}.{module}").PAGE for module in PAGE_MODULES]


def shared(request: Request, name: str, make):
    """The studio's one ``name`` object (``make()`` on first use: a page's models, threads, sessions), whose
    ``close`` runs when the studio shuts down."""
    state = request.app.state
    if not hasattr(state, name):
        setattr(state, name, make())
        state.on_shutdown.append(getattr(state, name).close)
    return getattr(state, name)
