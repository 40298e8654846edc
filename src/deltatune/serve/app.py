"""The HTTP layer: an OpenAI-compatible FastAPI app on an engine (``create_app``).

Every request first passes ``Guard`` (an ASGI middleware): a request id, the draining check, the
API key (401), admin rights (403), the key's rate (429), the body size (413, before anything parses
it, also for chunked bodies) and the time limit (408). Then the endpoint checks what the request
names: a model the key may not use (403), one that is not served (404, listing those that are), one
of the wrong kind (400), limits (400). Every error is OpenAI's error JSON; an unexpected exception
is logged with its traceback and answered 500 with a request id, never with the traceback.

This module imports the engine's interface from ``types`` only, never ``engine.py`` (an
import-linter contract), so it runs on any object with that interface (the tests use a fake).
"""

# No `from __future__ import annotations`: FastAPI reads the annotations of the endpoints defined in
# create_app at run time, and their request models are local to it (their limits come from the config).

import asyncio
import base64
import contextlib
import inspect
import json
import logging
import os
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import anyio
from annotated_types import Interval
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import ArgumentError, ConfigError, DeltatuneError
from .auth import NOBODY, Caller, Keys, RateLimiter, retry_after
from .config import ServeConfig
from .metrics import CONTENT_TYPE, Metrics
from .types import Chunk, EngineLike, Overloaded, Sampling, Served, TooLong, UnknownModel, WrongKind

log = logging.getLogger("deltatune.serve")

# ----------------------------------------------------------------------------- errors

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ERROR_TITLES = {400: "Invalid request: a parameter is malformed, over a limit, or the model cannot do this",
                401: "No API key, or one that is not valid (send Authorization: Bearer KEY)",
                403: "The API key may not use this model (or this endpoint)",
                404: "The model (or endpoint) does not exist; the message lists the models there are",
                408: "The request took longer than the server's limit", 413: "The request body is too large",
                429: "Over the API key's rate limit; Retry-After says when to try again",
                500: "Internal error (the server log has the details under the request id)",
                503: "Overloaded, not ready, or shutting down; Retry-After says when to try again"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""
    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def _short(text: str, limit: int = 80) -> str:
    """A client's string as an error message quotes it: repr'd, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _responses(*codes: int) -> dict:
    """OpenAPI response declarations of the error statuses an endpoint may answer."""
    out: dict[int, dict] = {}
    for code in codes:
        out[code] = {"model": ErrorResponse, "description": ERROR_TITLES[code]}
        if code in (429, 503):
            out[code]["headers"] = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                                    "schema": {"type": "string"}}}
    return out


# ----------------------------------------------------------------------------- request shapes

class _Strict(BaseModel):
    # Strict: "2" is not a number and true is not 1, as the schema says (1.0 is an integer, as in JSON Schema).
    # Unknown fields are ignored, as OpenAI-compatible servers do (docs/serving.md lists what is supported).
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="'developer' is treated as 'system' (chat templates know no other role).")
    content: str | list[TextPart]


class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="Send a last chunk with usage (and 'usage': null in the others).")


def _integral(value: Any) -> Any:
    """JSON Schema's integer includes 1.0; strict pydantic would refuse it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def Integer(ge: int, le: int) -> Any:
    """An integer in [ge, le] (in the schema as minimum and maximum)."""
    return Annotated[int, Interval(ge=ge, le=le), BeforeValidator(_integral)]

StopText = Annotated[str, Field(min_length=1)]
MODEL_DOC = "A served name: GET /v1/models lists them (a run's name, or 'base')."
SEED_MAX = 2**53 - 1  # the largest integer every JSON reader keeps exactly


def _request_models(limits) -> dict[str, type[BaseModel]]:
    """Request bodies; their maxima are this server's limits, so the OpenAPI schema states them."""
    Inputs = str | Annotated[list[str], Field(min_length=1, max_length=limits.max_inputs)]
    MaxTokens = Integer(1, limits.max_tokens)

    class SamplingFields(_Strict):
        model: str = Field(min_length=1, description=MODEL_DOC)
        temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (the most likely token at each step).")
        top_p: float = Field(1.0, gt=0, le=1, description="Sample from the smallest set of tokens with this much "
                                                          "probability.")
        n: Integer(1, limits.max_n) = Field(1, description="Independent completions per prompt.")
        stop: StopText | Annotated[list[StopText], Field(min_length=1, max_length=4)] | None = Field(
            None, description="Up to 4 sequences where generation stops (they are not part of the text).")
        seed: Integer(0, SEED_MAX) | None = Field(None, description="The same request with the same seed gives "
                                                                      "the same completions (choice i uses seed + i).")
        stream: bool = Field(False, description="Server-sent events in OpenAI's chunk format, ending with "
                                                "'data: [DONE]'.")
        stream_options: StreamOptions | None = None

    class ChatCompletionRequest(SamplingFields):
        messages: list[Message] = Field(min_length=1, description="The conversation; the run's chat template "
                                                                  "formats it, as in training.")
        max_tokens: MaxTokens | None = Field(None, description=f"Most tokens to generate (default and most: "
                                                               f"{limits.max_tokens}).")
        max_completion_tokens: MaxTokens | None = Field(None, description="OpenAI's newer name for max_tokens; "
                                                                          "wins when both are given.")

    class CompletionRequest(SamplingFields):
        prompt: str | Annotated[list[str], Field(min_length=1, max_length=limits.max_n)] = Field(
            description=f"A prompt, or up to {limits.max_n} (choice index = prompt index * n + i).")
        max_tokens: MaxTokens = Field(min(16, limits.max_tokens), description=f"Most tokens to generate (at most "
                                                                              f"{limits.max_tokens}).")

    class EmbeddingRequest(_Strict):
        model: str = Field(min_length=1, description=MODEL_DOC)
        input: Inputs = Field(description=f"A text or up to {limits.max_inputs} texts.")
        encoding_format: Literal["float", "base64"] = Field(
            "float", description="base64: little-endian float32 bytes, base64-encoded (the openai client's default).")

    class ClassifyRequest(_Strict):
        model: str = Field(min_length=1, description=MODEL_DOC)
        input: Inputs = Field(description=f"A text or up to {limits.max_inputs} texts.")

    class ScoreRequest(_Strict):
        model: str = Field(min_length=1, description=MODEL_DOC)
        prompt: Inputs = Field(description="A prompt, or one per response.")
        response: Inputs = Field(description="A response, or several (one prompt is paired with each; two lists "
                                             "pair up in order and must have the same length).")

    return {"chat": ChatCompletionRequest, "completion": CompletionRequest, "embedding": EmbeddingRequest,
            "classify": ClassifyRequest, "score": ScoreRequest}


class LoadRequest(_Strict):
    name: str = Field(min_length=1, description="A run name the serve config lists (read again from disk now).")
    run: str | None = Field(None, description="Optional: the run directory, which must be the one the config "
                                              "names (a request never chooses a path).")


class UnloadRequest(_Strict):
    name: str = Field(min_length=1, description="A served run name.")


# ----------------------------------------------------------------------------- response shapes

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class InputUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 "
                                                     "(encoding_format: base64).")


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: InputUsage


class LabelResult(BaseModel):
    index: int
    label: str
    probabilities: dict[str, float] = Field(description="Every label's probability (as deltatune predict).")


class TagResult(BaseModel):
    index: int
    tokens: list[str] = Field(description="The words of the text.")
    tags: list[str] = Field(description="One tag per word (as deltatune predict).")


class ClassifyList(BaseModel):
    object: Literal["list"] = "list"
    id: str
    created: int
    model: str
    data: list[LabelResult | TagResult]
    usage: InputUsage


class ScoreResult(BaseModel):
    index: int
    score: float


class ScoreList(BaseModel):
    object: Literal["list"] = "list"
    id: str
    created: int
    model: str
    data: list[ScoreResult]
    usage: InputUsage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "deltatune"
    kind: Literal["generate", "classify", "tag", "embed", "score"] = Field(
        description="What it answers: generate (chat/completions), classify or tag (/v1/classify), embed "
                    "(/v1/embeddings), score (/v1/score).")
    task: str
    method: str | None
    base: str
    labels: list[str] | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Deleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class ReloadResult(BaseModel):
    loaded: list[str] = Field(description="Names loaded (new in the config, or their run directory changed).")
    unloaded: list[str] = Field(description="Names no longer in the config.")
    unchanged: list[str]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    models: list[str]


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta = Field(description="The choice's first chunk: role and empty content; then content; "
                                          "its last chunk: {} with the finish_reason.")
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One event of a chat stream (OpenAI's chat.completion.chunk)."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice] = Field(description="Empty only in the usage chunk.")
    usage: Usage | None = Field(None, description="With stream_options.include_usage: null, and set in a last "
                                                  "chunk without choices.")


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionChunk(BaseModel):
    """One event of a completions stream (OpenAI's text_completion, finish_reason null until the end)."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


STREAM_MODELS = (ChatCompletionChunk, CompletionChunk)


def _sse_content(chunk: type[BaseModel]) -> dict:
    """The OpenAPI content of a stream: each event's data is a chunk (JSON), an error, or [DONE] last."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "description": "One server-sent event (stream: true): 'data: CHUNK' lines, then 'data: [DONE]'. An error "
                       "after the stream started is an event with OpenAI's error JSON.",
        "properties": {"data": {"type": "string", "anyOf": [
            {"const": "[DONE]"}, {"contentMediaType": "application/json", "contentSchema": payload}]}}}}}


# ----------------------------------------------------------------------------- state and guard

@dataclass
class ServerState:
    engine: EngineLike
    settings: ServeConfig
    keys: Keys | None
    reload: Callable[[], ServeConfig] | None = None
    metrics: Metrics = field(default_factory=Metrics)
    limiter: RateLimiter = field(default_factory=RateLimiter)
    created: int = field(default_factory=lambda: int(time.time()))
    started: bool = False
    draining: bool = False
    _drain: asyncio.Task | None = None
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> None:
        """Start the engine (loads the runs); once."""
        if not self.started:
            await self.engine.start()
            self.started = True

    async def drain(self) -> None:
        """Refuse new requests (503), let the engine finish what it holds. Idempotent."""
        self.draining = True
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.engine.drain())
        await asyncio.shield(self._drain)

    def read_config(self) -> ServeConfig:
        """The serve config as it is on disk now (validated; ConfigError lists what is wrong)."""
        return self.reload() if self.reload is not None else self.settings

    async def load(self, name: str, run: str) -> Served:
        """Serve ``run`` as ``name``: nothing to do if it is served already; a name served from another run
        directory is unloaded first (its requests in flight finish) and loaded again."""
        current = next((s for s in self.engine.served() if s.name == name), None)
        if current is not None:
            if _same_path(current.run, run):
                return current
            await self.engine.unload(name)
        return await self.engine.load(name, run)

    async def reload_config(self) -> dict[str, list[str]]:
        """Read the config again and make the served runs match it: load the new (or moved) ones,
        unload those no longer listed; re-read the keys file. In-flight requests are not dropped."""
        async with self._reload_lock:
            cfg = await asyncio.to_thread(self.read_config)
            if (cfg.api_keys is None) != (self.settings.api_keys is None) or cfg.host != self.settings.host \
                    or cfg.port != self.settings.port or cfg.limits != self.settings.limits:
                log.warning("serve config: host, port, limits and turning api_keys on or off take effect at the "
                            "next start; runs and the keys file's contents are applied now")
            if self.keys is not None and cfg.api_keys:
                self.keys = await asyncio.to_thread(Keys.read, cfg.api_keys, self.settings.limits.rate_limit_per_minute)
            served = {s.name: s for s in self.engine.served() if s.run is not None}
            result: dict[str, list[str]] = {"loaded": [], "unloaded": [], "unchanged": []}
            for name in sorted(set(served) - set(cfg.runs)):
                await self.engine.unload(name)
                result["unloaded"].append(name)
            for name, run in sorted(cfg.runs.items()):
                if name in served and _same_path(served[name].run, run):
                    result["unchanged"].append(name)
                    continue
                await self.load(name, run)
                result["loaded"].append(name)
            self.settings.runs = dict(cfg.runs)
            log.info("serve config read again: loaded %s, unloaded %s", result["loaded"] or "none",
                     result["unloaded"] or "none")
            return result


def _same_path(a: str | None, b: str) -> bool:
    """Two run directories are the same path (compared as text: a request's path is never looked up)."""
    return a is not None and os.path.normpath(os.path.join(os.getcwd(), a)) == os.path.normpath(os.path.join(os.getcwd(), b))


PUBLIC = frozenset({"/health", "/ready", "/openapi.json"})
ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/classify",
                    "/v1/score", "/health", "/ready", "/metrics", "/admin/load", "/admin/unload", "/admin/reload",
                    "/openapi.json"})
STREAM_GRACE_S = 5.0  # a stream ends itself at the time limit (an error event); the guard cuts it this much later


def endpoint_label(path: str) -> str:
    if path in ROUTES:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class _TooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class Guard:
    """ASGI middleware in front of every endpoint (see the module docstring)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        rid = f"req_{uuid.uuid4().hex}"
        scope["state"] = {**scope.get("state", {}), "request_id": rid}
        started = time.perf_counter()
        status = 0
        timer: asyncio.Timeout | None = None
        timing = False
        deadline = 0.0

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
                if timer is not None and timing:  # a stream ends itself at the deadline; this is the backstop
                    timer.reschedule(max(deadline, asyncio.get_running_loop().time()) + STREAM_GRACE_S)
            await send(message)

        state.metrics.in_flight += 1
        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
                return
            limits = state.settings.limits
            deadline = asyncio.get_running_loop().time() + limits.request_timeout_s
            scope["state"]["deadline"] = deadline
            try:
                async with asyncio.timeout_at(deadline) as timer:
                    timing = True
                    try:
                        body = await _read_body(scope, receive, limits.max_body_bytes)
                        await self.app(scope, _replay(body, receive), send_with_id)
                    finally:
                        timing = False
            except _TooLarge:
                await error_response(413, f"request body over this server's limit of {limits.max_body_bytes} "
                                          "bytes", "request_too_large")(scope, receive, send_with_id)
            except _ClientGone:
                pass
            except TimeoutError:
                if timer is None or not timer.expired():
                    raise
                if status == 0:
                    await error_response(408, f"request took longer than this server's limit of "
                                              f"{limits.request_timeout_s:g} s", "request_timeout")(
                        scope, receive, send_with_id)
                else:
                    log.warning("request %s: response cut off at the time limit", rid)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if status == 0:
                await error_response(500, f"internal server error (request id {rid}); the server log has the "
                                          "details", "internal_error")(scope, receive, send_with_id)
        finally:
            state.metrics.in_flight -= 1
            state.metrics.observe(endpoint_label(scope["path"]), scope["state"].get("model", ""), status or 499,
                                  time.perf_counter() - started)

    def _refuse(self, scope) -> JSONResponse | None:
        """The response refusing this request before it is read (503, 401, 403, 429, 413), or None."""
        path, state = scope["path"], self.state
        if path in PUBLIC:
            return None
        if state.draining and path.startswith(("/v1/", "/admin/")):
            return error_response(503, "the server is shutting down; send the request to another instance",
                                  "shutting_down", headers={"Retry-After": "5"})
        caller: Caller | None = NOBODY
        if state.keys is not None:
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            caller = state.keys.authenticate(header)
            if caller is None:
                message = ("invalid API key" if header else "no API key; send the header 'Authorization: Bearer KEY'")
                return error_response(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if path.startswith("/admin/") and not caller.admin:
            message = ("this API key may not use the admin endpoints (admin: true in the keys file)"
                       if state.keys is not None else "the admin endpoints need an api_keys file with an admin key "
                       "(admin: true); without one, SIGHUP reads the serve config again")
            return error_response(403, message, "admin_only")
        wait = state.limiter.take(caller.id, caller.rate_limit_per_minute)
        if wait is not None:
            return error_response(429, f"rate limit of {caller.rate_limit_per_minute} requests per minute reached "
                                       f"for API key {caller.id!r}; retry after {retry_after(wait)} s",
                                  "rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.strip().isdigit():
                return error_response(400, "Content-Length is not a number", "invalid_content_length")
            if int(length) > state.settings.limits.max_body_bytes:
                return error_response(413, f"request body over this server's limit of "
                                           f"{state.settings.limits.max_body_bytes} bytes", "request_too_large")
        scope["state"]["caller"] = caller
        return None


async def _read_body(scope, receive, limit: int) -> bytes:
    """The whole body, counted as it arrives (a chunked body has no Content-Length): _TooLarge over ``limit``."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def _replay(body: bytes, receive):
    """A receive that gives the body read already, then passes on (a stream watches for the disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ----------------------------------------------------------------------------- helpers of the endpoints

def _resolve(state: ServerState, request: Request, name: str, kinds: tuple[str, ...], endpoint: str) -> Served:
    """The served model a request names, if this key may use it and it can do ``kinds``. A name that is not
    one the engine lists is refused here, without asking the engine for it: names never become paths."""
    caller: Caller = request.state.caller
    served_now = state.engine.served()

    def available(kind: tuple[str, ...] | None = None) -> str:
        names = [s.name for s in served_now if caller.may_use(s.name) and (kind is None or s.kind in kind)]
        return ", ".join(names) or "none"

    if not caller.may_use(name):  # before the 404: a key learns nothing about names it may not use
        raise ApiError(403, f"this API key may not use model {_short(name)}; it may use: {available()}",
                       "model_not_allowed", "model")
    if name not in {s.name for s in served_now}:
        raise ApiError(404, f"model {_short(name)} does not exist; available: {available()}", "model_not_found",
                       "model")
    try:
        served = state.engine.get(name)
    except UnknownModel:
        raise ApiError(404, f"model {_short(name)} does not exist; available: {available()}", "model_not_found",
                       "model") from None
    if served.kind not in kinds:
        raise ApiError(400, f"model {name!r} is a {served.kind} model (task {served.task}); {endpoint} needs a "
                            f"{' or '.join(kinds)} model: {available(kinds)}", "wrong_model_kind", "model")
    request.state.model = name
    return served


def _model(served: Served, created: int) -> Model:
    return Model(id=served.name, created=created, kind=served.kind, task=served.task, method=served.method,
                 base=served.base, labels=served.labels)


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _count(state: ServerState, name: str, texts: list[str], param: str) -> list[int]:
    """Tokens of each input; over the prompt limit: 400 naming the input."""
    counts = [state.engine.count_tokens(name, t) for t in texts]
    limit = state.settings.limits.max_prompt_tokens
    for i, n in enumerate(counts):
        if n > limit:
            where = param if len(texts) == 1 else f"{param}[{i}]"
            raise ApiError(400, f"{where}: {n} tokens, over this server's limit of {limit}", "context_length_exceeded",
                           param)
    return counts


def _prompt(state: ServerState, make: Callable[[], list[int]], param: str) -> list[int]:
    try:
        ids = make()
    except TooLong as exc:
        raise ApiError(400, str(exc), "context_length_exceeded", param) from None
    limit = state.settings.limits.max_prompt_tokens
    if len(ids) > limit:
        raise ApiError(400, f"{param}: {len(ids)} tokens, over this server's limit of {limit}",
                       "context_length_exceeded", param)
    return ids


async def _open(engine: EngineLike, name: str, ids: list[int], sampling: Sampling) -> AsyncIterator[Chunk]:
    """engine.generate's iterator (an async generator, or a coroutine returning one)."""
    it = engine.generate(name, ids, sampling)
    return await it if inspect.isawaitable(it) else it


async def _close(it) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _all(coros: list) -> list:
    """Run concurrently; on the first error cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _collect(engine: EngineLike, name: str, ids: list[int], sampling: Sampling) -> tuple[str, int, str]:
    it = await _open(engine, name, ids, sampling)
    texts, count, finish = [], 0, None
    try:
        async for chunk in it:
            texts.append(chunk.text)
            count += len(chunk.token_ids)
            if chunk.finish_reason:
                finish = chunk.finish_reason
                break
    finally:
        await _close(it)
    return "".join(texts), count, _finish(finish)


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


async def _first(it) -> Chunk | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


def _stream_error(exc: BaseException | None, rid: str) -> dict:
    if isinstance(exc, Overloaded):
        return error_body(503, "the server is overloaded; retry later", "overloaded")
    if isinstance(exc, TooLong):
        return error_body(400, str(exc), "context_length_exceeded")
    if exc is None:
        return error_body(408, "the stream took longer than this server's time limit", "request_timeout")
    return error_body(500, f"internal server error (request id {rid}); the server log has the details",
                      "internal_error")


async def _generate(state: ServerState, request: Request, body, prompts: list[list[int]], max_tokens: int,
                    chat: bool):
    """Chat and text completions: n generations per prompt, gathered or streamed."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    jobs = [(p * body.n + i, ids, Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                           stop=list(stop), seed=None if body.seed is None else (body.seed + i) % (SEED_MAX + 1)))
            for p, ids in enumerate(prompts) for i in range(body.n)]
    prompt_tokens = sum(len(ids) for ids in prompts)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        return await _stream(state, request, body, jobs, prompt_tokens, rid, created, chat)
    results = await _all([_collect(state.engine, body.model, ids, s) for _, ids, s in jobs])
    completion_tokens = sum(count for _, count, _ in results)
    state.metrics.tokens(body.model, prompt_tokens, completion_tokens)
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    if chat:
        return ChatCompletion(id=rid, created=created, model=body.model, usage=usage, choices=[
            ChatChoice(index=index, message=AssistantMessage(content=text), finish_reason=finish)
            for (index, _, _), (text, _, finish) in zip(jobs, results)])
    return Completion(id=rid, created=created, model=body.model, usage=usage, choices=[
        CompletionChoice(index=index, text=text, finish_reason=finish)
        for (index, _, _), (text, _, finish) in zip(jobs, results)])


async def _stream(state: ServerState, request: Request, body, jobs, prompt_tokens: int, rid: str, created: int,
                  chat: bool) -> StreamingResponse:
    """Open every generation and wait for its first chunk before answering, so an engine refusal
    (overloaded, too long) is still an HTTP status; then stream."""
    iterators: list = []
    try:
        for _, ids, sampling in jobs:
            iterators.append(await _open(state.engine, body.model, ids, sampling))
        firsts = await _all([_first(it) for it in iterators])
    except BaseException:
        for it in iterators:
            await _close(it)
        raise
    events = _events(state, request, body, [index for index, _, _ in jobs], iterators, firsts, prompt_tokens, rid,
                     created, chat)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(state: ServerState, request: Request, body, indices: list[int], iterators: list, firsts: list,
                  prompt_tokens: int, rid: str, created: int, chat: bool):
    usage_on = bool(body.stream_options and body.stream_options.include_usage)
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": body.model, "system_fingerprint": None}
    if usage_on:
        head["usage"] = None
    completion_tokens = 0

    def event(index: int, text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    def chunk_events(index: int, chunk: Chunk) -> list[str]:
        nonlocal completion_tokens
        completion_tokens += len(chunk.token_ids)
        out = [event(index, chunk.text)] if chunk.text else []
        if chunk.finish_reason:
            out.append(event(index, None, _finish(chunk.finish_reason)))
        return out

    queue: asyncio.Queue = asyncio.Queue()
    tasks: list[asyncio.Task] = []

    async def pump(index: int, it) -> None:
        try:
            async for chunk in it:
                await queue.put((index, chunk, None))
                if chunk.finish_reason:
                    break
            await queue.put((index, None, None))
        except Exception as exc:  # noqa: BLE001 - sent to the client as an error event, logged there
            await queue.put((index, None, exc))
        finally:
            await _close(it)

    try:
        active = set()
        if chat:
            for index in indices:
                yield event(index, None, role=True)
        for index, it, first in zip(indices, iterators, firsts):
            if first is None or first.finish_reason:
                for line in chunk_events(index, first) if first else [event(index, None, "stop")]:
                    yield line
                await _close(it)
                continue
            for line in chunk_events(index, first):
                yield line
            active.add(index)
            tasks.append(asyncio.ensure_future(pump(index, it)))
        deadline = request.state.deadline
        loop = asyncio.get_running_loop()
        while active:
            try:
                index, chunk, exc = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.warning("request %s: stream ended at the time limit", request.state.request_id)
                yield _sse(_stream_error(None, request.state.request_id))
                yield DONE
                return
            if exc is not None:
                if not isinstance(exc, (Overloaded, TooLong)):
                    log.error("request %s: generation failed", request.state.request_id, exc_info=exc)
                yield _sse(_stream_error(exc, request.state.request_id))
                yield DONE
                return
            if chunk is None:
                active.discard(index)
                continue
            for line in chunk_events(index, chunk):
                yield line
            if chunk.finish_reason:
                active.discard(index)
        if usage_on:
            yield _sse({**head, "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                          "completion_tokens": completion_tokens,
                                                          "total_tokens": prompt_tokens + completion_tokens}})
        yield DONE
    finally:  # also when the client went away: stop the generations, let the engine free their slots
        state.metrics.tokens(body.model, prompt_tokens, completion_tokens)
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for it in iterators:
                await _close(it)


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    parts, first = [], None
    for error in errors[:5]:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        first = first or param
        parts.append(f"{param or 'body'}: {error.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, first


# ----------------------------------------------------------------------------- the app

def create_app(engine: EngineLike, settings: ServeConfig, *, reload: Callable[[], ServeConfig] | None = None,
               keys: Keys | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``settings`` (validated by config.load_serve_config).
    ``reload``: reads the serve config again (SIGHUP, /admin/load, /admin/reload). ``keys``: the API keys
    (default: read from settings.api_keys; none: no authentication)."""
    if keys is None and settings.api_keys:
        keys = Keys.read(settings.api_keys, settings.limits.rate_limit_per_minute)
    state = ServerState(engine, settings, keys, reload)
    limits = settings.limits
    bodies = _request_models(limits)
    ChatRequest, CompletionRequest = bodies["chat"], bodies["completion"]
    EmbeddingRequest, ClassifyRequest, ScoreRequest = bodies["embedding"], bodies["classify"], bodies["score"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.drain()

    app = FastAPI(title="deltatune serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible endpoints for deltatune runs (docs/serving.md).")
    app.state.serve = state
    auth = [Security(HTTPBearer(auto_error=False, description="An API key from the server's keys file."))] \
        if keys is not None else []
    common = (401, 429) if keys is not None else ()
    guarded = (*common, 408, 413, 500, 503)
    v1 = dict(dependencies=auth, tags=["v1"])

    @app.get("/v1/models", response_model=ModelList, responses=_responses(*guarded), **v1)
    async def list_models(request: Request) -> ModelList:
        """The served names this key may use."""
        caller: Caller = request.state.caller
        return ModelList(data=[_model(s, state.created) for s in engine.served() if caller.may_use(s.name)])

    @app.get("/v1/models/{model}", response_model=Model, responses=_responses(403, 404, *guarded), **v1)
    async def get_model(model: str, request: Request) -> Model:
        return _model(_resolve(state, request, model, ("generate", "classify", "tag", "embed", "score"),
                               "/v1/models"), state.created)

    generation_errors = _responses(400, 403, 404, *guarded)

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={200: {"content": _sse_content(ChatCompletionChunk)}, **generation_errors}, **v1)
    async def chat_completions(body: ChatRequest, request: Request):
        """Chat with a causal-LM run (its chat template formats the messages, as in training)."""
        _resolve(state, request, body.model, ("generate",), "/v1/chat/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in body.messages]
        ids = _prompt(state, lambda: engine.chat_prompt(body.model, messages), "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or limits.max_tokens
        return await _generate(state, request, body, [ids], max_tokens, chat=True)

    @app.post("/v1/completions", response_model=Completion,
              responses={200: {"content": _sse_content(CompletionChunk)}, **generation_errors}, **v1)
    async def completions(body: CompletionRequest, request: Request):
        """Continue a prompt (plain text, no chat template)."""
        _resolve(state, request, body.model, ("generate",), "/v1/completions")
        prompts = [_prompt(state, lambda p=p: engine.text_prompt(body.model, p), "prompt") for p in _texts(body.prompt)]
        return await _generate(state, request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/embeddings", response_model=EmbeddingList, responses=generation_errors, **v1)
    async def embeddings(body: EmbeddingRequest, request: Request) -> EmbeddingList:
        """Pooled vectors from an encoder (as feature extraction pools)."""
        _resolve(state, request, body.model, ("embed",), "/v1/embeddings")
        texts = _texts(body.input)
        tokens = sum(_count(state, body.model, texts, "input"))
        vectors = await engine.embed(body.model, texts)
        state.metrics.tokens(body.model, tokens)
        data = [Embedding(index=i, embedding=_base64(v) if body.encoding_format == "base64" else [float(x) for x in v])
                for i, v in enumerate(vectors)]
        return EmbeddingList(data=data, model=body.model, usage=InputUsage(prompt_tokens=tokens, total_tokens=tokens))

    @app.post("/v1/classify", response_model=ClassifyList, responses=generation_errors, **v1)
    async def classify(body: ClassifyRequest, request: Request) -> ClassifyList:
        """Labels with probabilities (classification runs) or one tag per word (token classification), the
        same numbers as deltatune predict."""
        _resolve(state, request, body.model, ("classify", "tag"), "/v1/classify")
        texts = _texts(body.input)
        tokens = sum(_count(state, body.model, texts, "input"))
        results = await engine.classify(body.model, texts)
        state.metrics.tokens(body.model, tokens)
        data = [TagResult(index=i, tokens=r["tokens"], tags=r["tags"]) if "tags" in r else
                LabelResult(index=i, label=r["label"], probabilities=r["probabilities"]) for i, r in enumerate(results)]
        return ClassifyList(id=f"clf-{uuid.uuid4().hex}", created=int(time.time()), model=body.model, data=data,
                            usage=InputUsage(prompt_tokens=tokens, total_tokens=tokens))

    @app.post("/v1/score", response_model=ScoreList, responses=generation_errors, **v1)
    async def score(body: ScoreRequest, request: Request) -> ScoreList:
        """A reward model's score of each (prompt, response) pair."""
        _resolve(state, request, body.model, ("score",), "/v1/score")
        prompts, responses = _texts(body.prompt), _texts(body.response)
        if len(prompts) == 1:
            prompts = prompts * len(responses)
        elif len(responses) == 1:
            responses = responses * len(prompts)
        if len(prompts) != len(responses):
            raise ApiError(400, f"prompt and response: {len(prompts)} prompts and {len(responses)} responses; give "
                                "one prompt, one response, or as many of each", "length_mismatch", "response")
        counts = [a + b for a, b in zip(_count(state, body.model, prompts, "prompt"),
                                         _count(state, body.model, responses, "response"))]
        limit = limits.max_prompt_tokens
        for i, n in enumerate(counts):
            if n > limit:
                raise ApiError(400, f"pair {i}: prompt and response are {n} tokens, over this server's limit of "
                                    f"{limit}", "context_length_exceeded", "response")
        scores = await engine.score(body.model, prompts, responses)
        state.metrics.tokens(body.model, sum(counts))
        return ScoreList(id=f"score-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                         data=[ScoreResult(index=i, score=float(s)) for i, s in enumerate(scores)],
                         usage=InputUsage(prompt_tokens=sum(counts), total_tokens=sum(counts)))

    @app.get("/health", response_model=Health, tags=["operations"])
    async def health() -> Health:
        """The process answers."""
        return Health()

    @app.get("/ready", response_model=Ready, responses=_responses(503), tags=["operations"])
    async def ready():
        """Models loaded and not draining: send traffic here."""
        names = [s.name for s in engine.served()] if state.started else []
        if state.draining or not names:
            why = "shutting down" if state.draining else "starting" if not state.started else "no models loaded"
            return error_response(503, f"not ready: {why}", "not_ready", headers={"Retry-After": "5"})
        return Ready(models=names)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["operations"], dependencies=auth,
             responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text format 0.0.4"}, **_responses(*guarded)})
    async def metrics() -> PlainTextResponse:
        """Requests by endpoint, model and status, latency, tokens; the engine's queue, batches and counts."""
        return PlainTextResponse(state.metrics.render(engine.stats()), media_type=CONTENT_TYPE)

    admin = dict(dependencies=auth, tags=["admin"])
    admin_errors = _responses(400, 401, 403, 404, 408, 413, 429, 500, 503)

    @app.post("/admin/load", response_model=Model, responses=admin_errors, **admin)
    async def admin_load(body: LoadRequest) -> Model:
        """Serve a run the serve config lists (the config is read again from disk first); a name served from
        another directory than the config's now is loaded again from the config's."""
        cfg = await asyncio.to_thread(state.read_config)
        if body.name not in cfg.runs:
            raise ApiError(404, f"{_short(body.name)} is not a run in the serve config (it lists: "
                                f"{', '.join(cfg.runs) or 'none'}); add it there first", "not_configured", "name")
        run = cfg.runs[body.name]
        if body.run is not None and not _same_path(body.run, run):
            raise ApiError(400, f"run: the serve config names {run} for {body.name!r}; admin load only loads the "
                                "configured run (edit the config, then load it or send SIGHUP)", "run_not_configured",
                           "run")
        return _model(await state.load(body.name, run), state.created)

    @app.post("/admin/unload", response_model=Deleted, responses=admin_errors, **admin)
    async def admin_unload(body: UnloadRequest) -> Deleted:
        """Stop serving a name (requests in flight finish)."""
        if body.name not in {s.name for s in engine.served()}:
            raise ApiError(404, f"model {_short(body.name)} is not served", "model_not_found", "name")
        await engine.unload(body.name)
        return Deleted(id=body.name, deleted=True)

    @app.post("/admin/reload", response_model=ReloadResult, responses=admin_errors, **admin)
    async def admin_reload() -> ReloadResult:
        """What SIGHUP does: read the serve config again, load and unload the difference."""
        return ReloadResult(**await state.reload_config())

    _install_handlers(app)
    app.add_middleware(Guard, state=state)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600,
                           expose_headers=["Retry-After", "X-Request-Id"])
    app.openapi = lambda: _openapi(app)
    return app


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 responses: validation errors are 400 in OpenAI's error shape."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                responses = operation.get("responses", {})
                responses.pop("422", None)
                for status, response in responses.items():  # errors are JSON, also where the success is text
                    content = response.get("content", {})
                    if not status.startswith("2") and content and "application/json" not in content:
                        response["content"] = {"application/json": next(iter(content.values()))}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, chunks = models_json_schema([(m, "serialization") for m in STREAM_MODELS],
                                       ref_template="#/components/schemas/{model}")
        components.update(chunks.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no such endpoint: {request.method} {_short(request.url.path)}",
                   405: f"method {request.method} not allowed here"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, None, None, getattr(exc, "headers", None))

    @app.exception_handler(UnknownModel)
    async def unknown(request: Request, exc: UnknownModel):
        caller: Caller = getattr(request.state, "caller", NOBODY)
        names = ", ".join(n for n in exc.available if caller.may_use(n)) or "none"
        return error_response(404, f"model {_short(exc.name)} is not served; available: {names}", "model_not_found",
                              "model")

    @app.exception_handler(WrongKind)
    async def wrong_kind(request: Request, exc: WrongKind):
        return error_response(400, str(exc), "wrong_model_kind", "model")

    @app.exception_handler(TooLong)
    async def too_long(request: Request, exc: TooLong):
        return error_response(400, str(exc), "context_length_exceeded")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        return error_response(503, "the server is overloaded; retry later", "overloaded",
                              headers={"Retry-After": retry_after(getattr(exc, "retry_after", 1.0))})

    @app.exception_handler(ArgumentError)
    async def bad_argument(request: Request, exc: ArgumentError):  # the engine's own checks of a request
        return error_response(400, str(exc), "invalid_value")

    @app.exception_handler(DeltatuneError)
    async def deltatune_error(request: Request, exc: DeltatuneError):
        if request.url.path.startswith("/admin/"):  # an admin sees why a configured run cannot load
            message = "\n".join(exc.problems) if isinstance(exc, ConfigError) else str(exc)
            return error_response(400, message, "cannot_load")
        raise exc  # anywhere else it is unexpected (its message may name files): the guard logs it, answers 500

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # reached only if the guard itself failed
        rid = getattr(request.state, "request_id", "?")
        log.error("request %s failed", rid, exc_info=exc)
        return error_response(500, f"internal server error (request id {rid}); the server log has the details",
                              "internal_error")
