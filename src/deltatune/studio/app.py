"""The studio's FastAPI app: the pages (``pages.PAGE_MODULES``), the static files shipped in the package,
the guard (``security.Guard``) and error pages that say what went wrong and what to do, never a trace."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DeltatuneError
from .jobs import Jobs
from .layout import error_page
from .pages import pages
from .security import Guard
from .settings import Settings

log = logging.getLogger("deltatune.studio")
STATIC = Path(__file__).parent / "static"
# Scripts only from the studio itself (no inline script); inline styles are the reports' (html_report).
POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
          "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


def create_app(settings: Settings | None = None, api=None) -> FastAPI:
    """The studio for ``settings``; ``api`` (an ASGI app, e.g. ``serve.app.create_app(...)``) is mounted at
    ``/api`` when given (it keeps its own authentication)."""
    settings = settings or Settings()
    app = FastAPI(title="deltatune studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.settings = settings
    app.state.on_shutdown = []  # what a page started that must stop with the studio (e.g. sampling threads)
    app.state.jobs = Jobs(settings.runs)
    app.state.streams = asyncio.Semaphore(settings.max_streams)
    registered = pages()
    app.state.nav = [(p.name, *p.nav) for p in registered if p.nav]
    guard = Guard(settings)

    @app.middleware("http")
    async def guarded(request: Request, call_next):
        if api is not None and request.url.path.startswith("/api/"):
            return await call_next(request)  # the serve API checks its own keys; no cookies there
        try:
            response = await guard(request, call_next)
        except Exception:  # a bug: logged for the terminal, a plain page for the browser
            log.exception("studio: %s %s failed", request.method, request.url.path)
            response = error_page(request, 500, "The studio could not show this page.")
        response.headers.setdefault("Content-Security-Policy", POLICY)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    _handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if api is not None:
        app.mount("/api", api)
    for page in registered:
        app.include_router(page.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    for stop in app.state.on_shutdown:
        await stop() if asyncio.iscoroutinefunction(stop) else await asyncio.to_thread(stop)


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_page(request, exc.status_code, str(exc.detail) if exc.detail else "That page does not exist.")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        fields = ", ".join(str(e.get("loc", ["?"])[-1]) for e in exc.errors()) or "the request"
        return error_page(request, 400, f"Some values of the request cannot be used: {fields}.")

    @app.exception_handler(DeltatuneError)
    async def deltatune_error(request: Request, exc: DeltatuneError):
        return error_page(request, 400, str(exc), "The message above says what to change.")
