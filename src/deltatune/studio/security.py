"""How the studio guards itself (DESIGN.md, "Servers"): loopback by default and a token for anything else;
a Host check against DNS rebinding; a CSRF token on every POST; file choices confined to a folder.

The CSRF token is the HMAC of a random per-browser session cookie (HttpOnly, SameSite=Strict) under a
secret drawn when the app starts: a form carries it as ``csrf_token``, a script as the ``X-CSRF-Token``
header (``layout`` puts it in a ``<meta name="csrf-token">`` and ``csrf_field``).
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import parse_qs, urlencode

from fastapi import HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from ..errors import ArgumentError
from .layout import error_page
from .settings import LOOPBACK, Settings

SESSION_COOKIE = "deltatune_session"
TOKEN_COOKIE = "deltatune_token"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORM = "application/x-www-form-urlencoded"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not (host in LOOPBACK or host.startswith("127.")) and not token:
        raise ArgumentError(f"studio: --host {host} lets other machines reach the studio; give --token TOKEN (or set DELTATUNE_STUDIO_TOKEN) too "
                            "(a long random string, e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`), "
                            "or leave --host out to bind 127.0.0.1")


def confined(root: Path, relative: str, what: str = "file") -> Path:
    """``relative`` inside ``root`` (both resolved, symlinks followed), or a 400 (not a plain relative path)
    / 403 (it leads outside ``root``). Never turns anything else into a path."""
    text = relative or ""
    parts = PurePosixPath(text.replace("\\", "/"))
    if not text or "\x00" in text or len(text) > 1024 or parts.is_absolute() or PureWindowsPath(text).drive \
            or ".." in parts.parts:
        raise HTTPException(400, f"{what}: give a path relative to {root}, without '..'")
    path = (root / parts).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(403, f"{what}: {text} leads outside {root}; the studio only reads files under it")
    return path


def csrf_for(secret: bytes, session: str) -> str:
    return hmac.new(secret, session.encode(), "sha256").hexdigest()[:40]


class Guard:
    """The checks every request passes, in order: Host, token, session cookie, CSRF on unsafe methods
    (with the urlencoded form parsed once, into ``request.state.form``)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.secret = secrets.token_bytes(32)

    async def __call__(self, request: Request, call_next) -> Response:
        try:
            return await self._guarded(request, call_next)
        except HTTPException as exc:  # raised here, outside the app's own handlers: shown the same way
            return error_page(request, exc.status_code, str(exc.detail))

    async def _guarded(self, request: Request, call_next) -> Response:
        bad_host = self._bad_host(request)
        if bad_host:
            raise HTTPException(400, bad_host)
        if self.settings.token:
            verdict = self._token(request)
            if verdict is not None:
                return verdict
        session = request.cookies.get(SESSION_COOKIE) or ""
        fresh = not session
        if fresh:
            session = secrets.token_urlsafe(24)
        request.state.csrf = csrf_for(self.secret, session)
        request.state.form = {}
        if request.method in UNSAFE:
            await self._check_csrf(request, fresh)
        response = await call_next(request)
        if fresh:
            response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict")
        return response

    def _bad_host(self, request: Request) -> str | None:
        if self.settings.token and not self.settings.loopback:
            return None  # reached from other machines under any name; the token guards it
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if host in LOOPBACK or host in self.settings.allowed_hosts or host.startswith("127."):
            return None
        return f"this studio answers to localhost and 127.0.0.1, not to {host or 'a request without a Host'}"

    def _token(self, request: Request) -> Response | None:
        token = self.settings.token or ""
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given.encode(), token.encode()):
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        header = request.headers.get("authorization", "")
        sent = request.cookies.get(TOKEN_COOKIE) or (header[7:] if header.lower().startswith("bearer ") else "")
        if sent and hmac.compare_digest(sent.encode(), token.encode()):
            return None
        raise HTTPException(401, "this studio needs its token: open the address `deltatune studio` printed "
                                 "(it ends in ?token=...), or send the header Authorization: Bearer TOKEN")

    async def _check_csrf(self, request: Request, fresh: bool) -> None:
        form: dict[str, list[str]] = {}
        if request.headers.get("content-type", "").split(";")[0].strip() == FORM:
            form = parse_qs((await _bounded_body(request, self.settings.max_form_bytes)).decode("utf-8", "replace"),
                            keep_blank_values=True)
            request.state.form = form
        sent = request.headers.get(CSRF_HEADER) or (form.get(CSRF_FIELD) or [""])[0]
        if fresh or not sent or not hmac.compare_digest(sent.encode(), request.state.csrf.encode()):
            raise HTTPException(403, "this form is out of date or came from another site (its CSRF token does not "
                                     "match): reload the page and try again")


async def _bounded_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the form is larger than {limit:,} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the form is larger than {limit:,} bytes")
    return bytes(body)


def form_value(request: Request, name: str, default: str = "") -> str:
    """One field of the POSTed form (parsed by ``Guard``)."""
    return (getattr(request.state, "form", {}).get(name) or [default])[0]
