"""`deltatune serve`'s HTTP layer (serve/app.py, auth.py, config.py) on a fake engine.

``FakeEngine`` implements the engine's interface (serve/types.py) deterministically: generation streams
"hello world" one token at a time, classify gives fixed probabilities, embeddings and scores come from
the text lengths. Most tests drive the app in-process (Starlette's TestClient); one starts a real
uvicorn server on a free loopback port and drives it with the official ``openai`` client; one runs
schemathesis against the served OpenAPI schema; two start `deltatune serve`'s server in a subprocess
for SIGTERM and SIGHUP.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import schemathesis
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from deltatune.errors import ConfigError, DeltatuneError
from deltatune.serve.app import create_app
from deltatune.serve.auth import Caller, Keys, RateLimiter, hash_key
from deltatune.serve.config import Limits, ServeConfig, explain, load_serve_config
from deltatune.serve.types import Chunk, Overloaded, Sampling, Served, TooLong, UnknownModel
from tests.helpers import serving

ROOT = Path(__file__).parents[2]
WORDS = ["hello", " world"]


class FakeEngine:
    """The engine interface (serve/types.py), deterministic and instant (``token_delay`` slows generation)."""

    def __init__(self, runs: dict | None = None, *, max_prompt_tokens: int = 2048, token_delay: float = 0.0,
                 **_):
        self.max_prompt_tokens = max_prompt_tokens
        self.token_delay = token_delay
        self.words = list(WORDS)  # what generate streams, one token each
        self.models: dict[str, Served] = {
            "base": Served("base", "generate", "causal_lm", None, None, "tiny-llm", None),
            "chat": Served("chat", "generate", "causal_lm", "lora", "/runs/chat", "tiny-llm", None),
            "sentiment": Served("sentiment", "classify", "classification", "lora", "/runs/sentiment", "tiny-bert",
                                ["negative", "positive"]),
            "ner": Served("ner", "tag", "token_classification", "ia3", "/runs/ner", "tiny-bert", ["O", "B-PER"]),
            "embedder": Served("embedder", "embed", "classification", "bitfit", "/runs/embedder", "tiny-bert", None),
            "reward": Served("reward", "score", "reward", "lora", "/runs/reward", "tiny-llm", None),
        }
        for name, run in (runs or {}).items():
            self.models[name] = Served(name, "classify", "classification", "lora", str(run), "tiny-bert", ["a", "b"])
        self.started = False
        self.drained = False
        self.in_flight = 0
        self.overloaded = False
        self.fail: Exception | None = None
        self.loads: list[tuple[str, str]] = []
        self.unloaded: dict[str, Served] = {}
        self.samplings: list[Sampling] = []

    async def start(self):
        self.started = True

    async def drain(self):
        self.drained = True
        while self.in_flight:
            await asyncio.sleep(0.01)

    def served(self) -> list[Served]:
        return list(self.models.values())

    def get(self, name: str) -> Served:
        if name not in self.models:
            raise UnknownModel(name, list(self.models))
        return self.models[name]

    async def load(self, name, run_dir) -> Served:
        if name in self.models:  # as the real engine: unload first
            raise DeltatuneError(f"{name!r} is served already; unload it first")
        self.loads.append((name, str(run_dir)))
        old = self.unloaded.get(name) or Served(name, "classify", "classification", "lora", "", "tiny-bert", ["a", "b"])
        self.models[name] = dataclasses.replace(old, run=str(run_dir))
        return self.models[name]

    async def unload(self, name):
        self.get(name)
        self.unloaded[name] = self.models.pop(name)

    def chat_prompt(self, name, messages) -> list[int]:
        return self.text_prompt(name, " ".join(f"{m['role']}: {m['content']}" for m in messages))

    def text_prompt(self, name, prompt) -> list[int]:
        ids = [len(word) for word in prompt.split()] or [0]
        if len(ids) > self.max_prompt_tokens:
            raise TooLong(f"prompt: {len(ids)} tokens, over the limit of {self.max_prompt_tokens}")
        return ids

    async def generate(self, name, prompt_ids, sampling: Sampling):
        if self.overloaded:
            raise Overloaded("queue full")
        if self.fail is not None:
            raise self.fail
        self.samplings.append(sampling)
        self.in_flight += 1
        try:
            text = ""
            words = self.words
            for i, word in enumerate(words[: sampling.max_tokens]):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                stop = next((s for s in sampling.stop if s in text + word), None)
                if stop is not None:
                    yield Chunk((text + word)[: (text + word).index(stop)][len(text):], [100 + i], "stop")
                    return
                text += word
                last = i == len(words) - 1 or i == sampling.max_tokens - 1
                yield Chunk(word, [100 + i], None if not last else "stop" if i == len(words) - 1 else "length")
        finally:
            self.in_flight -= 1

    async def classify(self, name, texts) -> list[dict]:
        if self.fail is not None:
            raise self.fail
        if self.models[name].kind == "tag":
            return [{"text": t, "tokens": t.split(), "tags": ["O"] * len(t.split())} for t in texts]
        return [{"text": t, "label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75}} for t in texts]

    async def embed(self, name, texts) -> list[list[float]]:
        return [[float(len(t)), 1.0, -0.5] for t in texts]

    async def score(self, name, prompts, responses) -> list[float]:
        return [float(len(p) - len(r)) for p, r in zip(prompts, responses)]

    def stats(self) -> dict:  # the real engine's shape
        return {"queue_depth": 1, "running_sequences": self.in_flight, "tokens_generated": 12,
                "batch_sizes": {"classify": {1: 3, 4: 2}, "generate": {2: 1}}, "requests": {"chat": 3, "sentiment": 2}}

    def count_tokens(self, name, text) -> int:
        return len(text.split())


# ----------------------------------------------------------------------------- fixtures

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-0123456789", "carol": "sk-carol-0123456789",
        "ops": "sk-ops-0123456789"}


def completed_run(path: Path) -> Path:
    """A directory that rundir.RunDir.require_complete accepts."""
    (path / "delta").mkdir(parents=True)
    (path / "metrics.json").write_text("{}")
    (path / "status.json").write_text(json.dumps({"status": "completed"}))
    return path


def write_keys(path: Path, **overrides) -> Path:
    entries = {"alice": {"sha256": hash_key(KEYS["alice"])},
               "bob": {"sha256": hash_key(KEYS["bob"]), "models": ["sentiment"]},
               "carol": {"sha256": hash_key(KEYS["carol"]), "rate_limit_per_minute": 2},
               "ops": {"sha256": hash_key(KEYS["ops"]), "admin": True}}
    entries.update(overrides)
    path.write_text(yaml.safe_dump(entries))
    return path


def make_settings(tmp_path: Path, keys: bool = True, **limits) -> ServeConfig:
    runs = {"chat": str(completed_run(tmp_path / "runs" / "chat"))}
    return ServeConfig(runs=runs, api_keys=str(write_keys(tmp_path / "keys.yaml")) if keys else None,
                       limits=Limits(**{"rate_limit_per_minute": 0, **limits}))


def auth(who: str = "alice") -> dict:
    return {"Authorization": f"Bearer {KEYS[who]}"}


@pytest.fixture
def served(tmp_path):
    """(client, engine) for an app with keys; the client sends alice's key (all models, no rate limit)."""
    engine = FakeEngine()
    app = create_app(engine, make_settings(tmp_path))
    with TestClient(app, headers=auth()) as client:
        yield client, engine


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi there"}]}


# ----------------------------------------------------------------------------- endpoints

def test_models_lists_the_served_names_without_paths(served):
    client, _ = served
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    names = {m["id"]: m for m in body["data"]}
    assert set(names) == {"base", "chat", "sentiment", "ner", "embedder", "reward"}
    assert names["sentiment"]["kind"] == "classify" and names["sentiment"]["labels"] == ["negative", "positive"]
    assert all(m["object"] == "model" and m["owned_by"] == "deltatune" for m in body["data"])
    assert "/runs/" not in json.dumps(body)  # run directories are the server's business
    assert client.get("/v1/models/ner").json()["kind"] == "tag"


def test_chat_completion_in_openai_shape(served):
    client, engine = served
    body = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8, "temperature": 0, "seed": 7}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "chat"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello world"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert engine.samplings[-1] == Sampling(max_tokens=8, temperature=0.0, top_p=1.0, stop=[], seed=7)


def test_chat_n_stop_and_length(served):
    client, engine = served
    body = client.post("/v1/chat/completions", json={**CHAT, "n": 3, "seed": 10, "max_completion_tokens": 1}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "hello" and c["finish_reason"] == "length" for c in body["choices"])
    assert [s.seed for s in engine.samplings[-3:]] == [10, 11, 12]  # independent generations
    assert body["usage"]["completion_tokens"] == 3
    body = client.post("/v1/chat/completions", json={**CHAT, "stop": " wor"}).json()
    assert body["choices"][0]["message"]["content"] == "hello" and body["choices"][0]["finish_reason"] == "stop"
    assert engine.samplings[-1].stop == [" wor"] and engine.samplings[-1].max_tokens == 512  # the limit is the default


def test_completions_with_several_prompts(served):
    client, _ = served
    body = client.post("/v1/completions", json={"model": "base", "prompt": ["a b", "c"], "n": 2}).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(i, "hello world") for i in range(4)]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}


def sse_events(text: str) -> list[str]:
    """The data: payloads of a server-sent event stream; every other non-empty line is an error."""
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert text.endswith("\n\n")
    return [line[len("data: "):] for line in lines]


def test_chat_stream_is_openai_chunks_ending_with_done(served):
    from openai.types.chat import ChatCompletionChunk

    client, _ = served
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2,
                                                         "stream_options": {"include_usage": True}})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)  # the official client's own type
        assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "chat"
    assert len({c["id"] for c in chunks}) == 1
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == "hello world"
        assert [c["finish_reason"] for c in mine][-1] == "stop" and mine[-1]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                                   "total_tokens": 7}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_completion_stream(served):
    client, _ = served
    response = client.post("/v1/completions", json={"model": "chat", "prompt": "x", "stream": True, "max_tokens": 1})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # OpenAI streams its Completion shape, with finish_reason null until the last chunk of a choice
    assert all(set(c) == {"id", "object", "created", "model", "choices", "system_fingerprint"} for c in chunks)
    assert all(set(c["choices"][0]) == {"text", "index", "logprobs", "finish_reason"} for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
    assert all(c["object"] == "text_completion" for c in chunks)


def test_embeddings_float_and_base64(served):
    client, _ = served
    body = client.post("/v1/embeddings", json={"model": "embedder", "input": ["ab", "abcd e"]}).json()
    assert body["object"] == "list" and body["model"] == "embedder"
    assert [d["embedding"] for d in body["data"]] == [[2.0, 1.0, -0.5], [6.0, 1.0, -0.5]]
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    body = client.post("/v1/embeddings", json={"model": "embedder", "input": "ab", "encoding_format": "base64"}).json()
    assert struct.unpack("<3f", base64.b64decode(body["data"][0]["embedding"])) == (2.0, 1.0, -0.5)


def test_classify_labels_and_tags(served):
    client, _ = served
    body = client.post("/v1/classify", json={"model": "sentiment", "input": ["good film", "bad"]}).json()
    assert body["object"] == "list" and body["model"] == "sentiment"
    assert body["data"] == [{"index": i, "label": "positive", "probabilities": {"negative": 0.25, "positive": 0.75}}
                            for i in (0, 1)]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    body = client.post("/v1/classify", json={"model": "ner", "input": "Ann sees Bob"}).json()
    assert body["data"] == [{"index": 0, "tokens": ["Ann", "sees", "Bob"], "tags": ["O", "O", "O"]}]


def test_score_pairs_and_broadcast(served):
    client, _ = served
    body = client.post("/v1/score", json={"model": "reward", "prompt": "abc", "response": ["a", "abcd"]}).json()
    assert [(d["index"], d["score"]) for d in body["data"]] == [(0, 2.0), (1, -1.0)]
    body = client.post("/v1/score", json={"model": "reward", "prompt": ["a", "b"], "response": ["x", "y"]}).json()
    assert len(body["data"]) == 2
    error = assert_error(client.post("/v1/score", json={"model": "reward", "prompt": ["a", "b"],
                                                        "response": ["x", "y", "z"]}), 400, "length_mismatch")
    assert error["param"] == "response"


def test_wrong_kind_is_400_naming_the_models_that_can(served):
    client, _ = served
    error = assert_error(client.post("/v1/classify", json={"model": "chat", "input": "x"}), 400, "wrong_model_kind")
    assert "sentiment" in error["message"] and "ner" in error["message"] and error["param"] == "model"
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "sentiment"}), 400, "wrong_model_kind")
    assert_error(client.post("/v1/embeddings", json={"model": "reward", "input": "x"}), 400, "wrong_model_kind")


def test_health_ready(served):
    client, engine = served
    assert client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
    ready = client.get("/ready", headers={"Authorization": ""})
    assert ready.status_code == 200 and "chat" in ready.json()["models"]
    assert engine.started


# ----------------------------------------------------------------------------- auth

def test_no_key_or_a_wrong_key_is_401(served):
    client, _ = served
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS["alice"]},
                    {"Authorization": "Basic " + base64.b64encode(b"x:y").decode()}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics"),
                             ("POST", "/admin/reload"), ("GET", "/no/such/path")):
            response = client.request(method, path, headers=headers, json=CHAT)
            error = assert_error(response, 401, "invalid_api_key")
            assert error["type"] == "authentication_error" and response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models", headers=auth("bob")).status_code == 200


def test_a_key_sees_and_uses_only_its_models(served):
    client, _ = served
    body = client.get("/v1/models", headers=auth("bob")).json()
    assert [m["id"] for m in body["data"]] == ["sentiment"]
    response = client.post("/v1/chat/completions", json=CHAT, headers=auth("bob"))
    error = assert_error(response, 403, "model_not_allowed")
    assert error["type"] == "permission_error" and "sentiment" in error["message"] and "ner" not in error["message"]
    assert_error(client.get("/v1/models/chat", headers=auth("bob")), 403)
    assert client.post("/v1/classify", json={"model": "sentiment", "input": "x"}, headers=auth("bob")).status_code == 200


def test_rate_limit_is_429_with_retry_after(served):
    client, _ = served
    # carol: 2 requests per minute
    assert client.get("/v1/models", headers=auth("carol")).status_code == 200
    assert client.post("/v1/classify", json={"model": "x"}, headers=auth("carol")).status_code == 400
    response = client.get("/v1/models", headers=auth("carol"))
    error = assert_error(response, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and 1 <= int(response.headers["retry-after"]) <= 30
    assert client.get("/v1/models").status_code == 200  # alice has her own bucket


def test_token_bucket_refills():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("k", 60) for _ in range(60)] == [None] * 60
    assert limiter.take("k", 60) == pytest.approx(1.0)
    now[0] = 0.5
    assert limiter.take("k", 60) == pytest.approx(0.5)
    now[0] = 1.6
    assert limiter.take("k", 60) is None and limiter.take("k", 0) is None


def test_keys_are_hashed_and_checked_in_constant_time(tmp_path):
    keys = Keys.read(write_keys(tmp_path / "keys.yaml"), 600)
    assert keys.authenticate(f"Bearer {KEYS['bob']}").id == "bob"
    assert keys.authenticate(f"bearer  {KEYS['ops']} ").admin
    for header in (None, "", "Bearer", f"Token {KEYS['bob']}", "Bearer " + hash_key(KEYS["bob"])):
        assert keys.authenticate(header) is None
    text = (tmp_path / "keys.yaml").read_text()
    assert all(key not in text for key in KEYS.values())
    source = (ROOT / "src/deltatune/serve/auth.py").read_text()
    assert "hmac.compare_digest" in source and "==" not in source.split("def authenticate")[1].split("class ")[0]
    assert keys.callers["alice"].rate_limit_per_minute == 600 and keys.callers["carol"].rate_limit_per_minute == 2


@pytest.mark.parametrize("entry, problem", [
    ({"sha256": "abc"}, "expected 64 hex digits"),
    ({"sha256": hash_key("k"), "modles": ["x"]}, "unknown key (did you mean 'models'?)"),
    ({"sha256": hash_key("k"), "admin": "yes"}, "expected true or false"),
    ({"sha256": hash_key("k"), "rate_limit_per_minute": -1}, "must be 0 (no limit) or more"),
    ({"sha256": hash_key(KEYS["alice"])}, "the same key as alice"),
])
def test_bad_keys_files_are_refused(tmp_path, entry, problem):
    path = write_keys(tmp_path / "keys.yaml", zed=entry)
    with pytest.raises(ConfigError, match=re.escape(problem)):
        Keys.read(path, 600)


def test_keys_file_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(f"a:\n  sha256: {hash_key('x')}\na:\n  sha256: {hash_key('y')}\n")
    with pytest.raises(ConfigError, match="given twice"):
        Keys.read(path, 600)


def test_admin_endpoints_need_an_admin_key(served, tmp_path):
    client, engine = served
    error = assert_error(client.post("/admin/unload", json={"name": "chat"}), 403, "admin_only")
    assert "admin" in error["message"]
    assert "chat" in engine.models
    response = client.post("/admin/unload", json={"name": "chat"}, headers=auth("ops"))
    assert response.json() == {"id": "chat", "object": "model", "deleted": True}
    assert "chat" not in engine.models
    assert_error(client.post("/admin/unload", json={"name": "chat"}, headers=auth("ops")), 404, "model_not_found")


def test_admin_load_only_loads_runs_the_config_names(tmp_path):
    engine = FakeEngine()
    settings = make_settings(tmp_path)
    extra = completed_run(tmp_path / "runs" / "extra")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"runs": {"chat": settings.runs["chat"]}, "api_keys": settings.api_keys}))
    app = create_app(engine, settings, reload=lambda: load_serve_config(config))
    with TestClient(app, headers=auth("ops")) as client:
        assert_error(client.post("/admin/load", json={"name": "extra"}), 404, "not_configured")
        assert_error(client.post("/admin/load", json={"name": "extra", "run": str(extra)}), 404, "not_configured")
        config.write_text(yaml.safe_dump({"runs": {"chat": settings.runs["chat"], "extra": str(extra)},
                                          "api_keys": settings.api_keys}))
        error = assert_error(client.post("/admin/load", json={"name": "extra", "run": "/etc"}), 400)
        assert error["param"] == "run"
        body = client.post("/admin/load", json={"name": "extra", "run": str(extra)}).json()
        assert body["id"] == "extra" and engine.loads == [("extra", str(extra))]
        assert client.post("/admin/load", json={"name": "extra"}).json()["id"] == "extra"  # served already
        assert engine.loads == [("extra", str(extra))]
        (extra / "metrics.json").unlink()  # the config now names a run that failed
        (extra / "status.json").write_text(json.dumps({"status": "failed"}))
        error = assert_error(client.post("/admin/load", json={"name": "extra"}), 400)
        assert str(extra) in error["message"] and "not completed" in error["message"]


def test_reload_loads_and_unloads_the_difference(tmp_path):
    engine = FakeEngine()
    settings = make_settings(tmp_path)
    runs = {"sentiment": str(completed_run(tmp_path / "runs" / "sentiment")),
            "fresh": str(completed_run(tmp_path / "runs" / "fresh"))}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"runs": runs, "api_keys": settings.api_keys}))
    app = create_app(engine, settings, reload=lambda: load_serve_config(config))
    with TestClient(app, headers=auth("ops")) as client:
        body = client.post("/admin/reload").json()
    # chat, ner, embedder, reward are gone from the config; sentiment moved to another directory; fresh is new
    assert body == {"loaded": ["fresh", "sentiment"], "unloaded": ["chat", "embedder", "ner", "reward"],
                    "unchanged": []}
    assert set(engine.models) == {"base", "sentiment", "fresh"}
    assert engine.models["sentiment"].run == runs["sentiment"] and engine.models["sentiment"].kind == "classify"


# ----------------------------------------------------------------------------- limits

def test_oversized_body_is_413_before_parsing(served, tmp_path):
    client, _ = served
    big = {"model": "chat", "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    assert_error(client.post("/v1/chat/completions", json=big), 413, "request_too_large")

    def chunked():  # no Content-Length: the body is counted as it arrives
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(200):
            yield b"x" * 10_000
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_error(response, 413, "request_too_large")
    assert_error(client.post("/v1/models", content=b"{}", headers={"Content-Length": "ten"}), 400)


def test_max_tokens_and_n_over_the_limit_are_400(served):
    client, _ = served
    for extra, param in (({"max_tokens": 513}, "max_tokens"), ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
                         ({"n": 5}, "n"), ({"n": 0}, "n"), ({"temperature": 3}, "temperature"),
                         ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"max_tokens": "5"}, "max_tokens")):
        error = assert_error(client.post("/v1/chat/completions", json={**CHAT, **extra}), 400, "invalid_value")
        assert error["param"].startswith(param), error
    error = assert_error(client.post("/v1/completions", json={"model": "chat", "prompt": ["a"] * 5}), 400)
    assert error["param"].startswith("prompt")
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 4  # the limits are in the schema


def test_prompt_over_the_token_limit_is_400(tmp_path):
    engine = FakeEngine()
    app = create_app(engine, make_settings(tmp_path, max_prompt_tokens=5))
    with TestClient(app, headers=auth()) as client:
        error = assert_error(client.post("/v1/completions", json={"model": "chat", "prompt": "a " * 6}), 400,
                             "context_length_exceeded")
        assert "6 tokens" in error["message"] and error["param"] == "prompt"
        error = assert_error(client.post("/v1/embeddings", json={"model": "embedder", "input": ["a", "b " * 9]}),
                             400, "context_length_exceeded")
        assert error["message"].startswith("input[1]: 9 tokens")
        engine.max_prompt_tokens = 2  # the engine's own refusal (TooLong) is a 400 too
        assert_error(client.post("/v1/completions", json={"model": "chat", "prompt": "a b c"}), 400,
                     "context_length_exceeded")


def test_slow_request_is_408(tmp_path):
    engine = FakeEngine(token_delay=0.5)
    app = create_app(engine, make_settings(tmp_path, request_timeout_s=0.3))
    with TestClient(app, headers=auth()) as client:
        error = assert_error(client.post("/v1/chat/completions", json=CHAT), 408, "request_timeout")
        assert error["type"] == "timeout_error"
        # a stream that started answers 200; at the limit it ends with an error event
        engine.token_delay = 0.2
        response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert response.status_code == 200
        events = sse_events(response.text)
        assert json.loads(events[-2])["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"


def test_overloaded_is_503_with_retry_after(served):
    client, engine = served
    engine.overloaded = True
    for body in (CHAT, {**CHAT, "stream": True}):
        response = client.post("/v1/chat/completions", json=body)
        assert_error(response, 503, "overloaded")
        assert int(response.headers["retry-after"]) >= 1


# ----------------------------------------------------------------------------- names never become paths

TRAVERSAL = ["../../etc/passwd", "/abs", "run/../x", "..", "chat/../chat", "C:\\Windows", "chat\x00", "~root"]


def test_unknown_model_is_404_listing_the_names(served):
    client, _ = served
    error = assert_error(client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}), 404, "model_not_found")
    assert error["param"] == "model" and "'nope'" in error["message"]
    assert all(name in error["message"] for name in ("base", "chat", "sentiment"))
    error = assert_error(client.post("/v1/classify", json={"model": "x" * 5000, "input": "a"}), 404)
    assert len(error["message"]) < 300  # a request's text is quoted cut short
    # a key limited to some models hears 403 for any other name, existing or not, and only of its own names
    for name in ("chat", "nope"):
        error = assert_error(client.post("/v1/classify", json={"model": name, "input": "a"}, headers=auth("bob")),
                             403, "model_not_allowed")
        assert error["message"].endswith("it may use: sentiment")


def test_any_name_the_engine_lists_is_served(served):
    """The engine names a base model 'base', or 'base:<folder>' when the runs have several bases."""
    client, engine = served
    engine.models["base:tiny-llm"] = dataclasses.replace(engine.models["base"], name="base:tiny-llm")
    body = client.post("/v1/completions", json={"model": "base:tiny-llm", "prompt": "x"}).json()
    assert body["choices"][0]["text"] == "hello world"
    assert client.get("/v1/models/base:tiny-llm").json()["id"] == "base:tiny-llm"


def test_the_engines_own_refusals_are_400_and_other_errors_500(served):
    from deltatune.errors import ArgumentError, RunError

    client, engine = served
    engine.fail = ArgumentError("sentiment: the prompt must be token ids")
    assert_error(client.post("/v1/classify", json={"model": "sentiment", "input": "x"}), 400, "invalid_value")
    engine.fail = RunError("/home/me/runs/x: corrupted")  # may name files: not for clients
    response = client.post("/v1/classify", json={"model": "sentiment", "input": "x"})
    assert_error(response, 500, "internal_error")
    assert "/home/me" not in response.text


def test_traversal_names_are_404_and_never_touch_the_file_system(served, monkeypatch):
    client, engine = served
    touched: list = []

    def hook(event, args):
        if event in ("open", "os.listdir", "os.scandir", "os.chdir") and args and any(
                marker in str(args[0]) for marker in ("passwd", "abs", "run/..", "Windows", "root")):
            touched.append((event, args[0]))

    sys.addaudithook(hook)  # stays installed; only this test's markers count
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: touched.append(("stat", path)) or real_stat(path, *a, **k)
                        if any(m in str(path) for m in ("passwd", "/abs", "run/..")) else real_stat(path, *a, **k))
    asked: list[str] = []
    real_get = engine.get
    engine.get = lambda name: asked.append(name) or real_get(name)
    for name in TRAVERSAL:
        for path, body in (("/v1/chat/completions", {**CHAT, "model": name}),
                           ("/v1/embeddings", {"model": name, "input": "x"}),
                           ("/v1/classify", {"model": name, "input": "x"}),
                           ("/admin/unload", {"name": name})):
            response = client.post(path, json=body, headers=auth("ops") if path.startswith("/admin") else auth())
            assert_error(response, 404)
    assert client.get("/v1/models/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert touched == [] and asked == []  # the engine was never even asked about such a name


# ----------------------------------------------------------------------------- errors

def test_every_error_is_openai_shaped(served):
    client, _ = served
    cases = [client.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
             client.post("/v1/chat/completions", content=json.dumps(CHAT)),  # no Content-Type
             client.post("/v1/chat/completions", json={"model": "chat"}),
             client.post("/v1/chat/completions", json={**CHAT, "messages": [{"role": "robot", "content": "x"}]}),
             client.post("/v1/chat/completions", json=[1, 2]),
             client.get("/v1/chat/completions"),
             client.get("/nowhere"),
             client.delete("/v1/models")]
    for response, status in zip(cases, (400, 400, 400, 400, 400, 405, 404, 405)):
        assert_error(response, status)
        assert response.headers["x-request-id"].startswith("req_")
    assert "POST" in cases[5].headers["allow"]
    assert "openapi" not in client.get("/docs").text.lower()  # no docs UI (it would load scripts from a CDN)


def test_a_crash_is_500_with_a_request_id_and_no_traceback(served, caplog):
    client, engine = served
    engine.fail = RuntimeError("secret detail from /home/me/secret.py")
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/chat/completions", {**CHAT, "stream": True}),
                       ("/v1/classify", {"model": "sentiment", "input": "x"})):
        with caplog.at_level("ERROR", logger="deltatune.serve"):
            response = client.post(path, json=body)
        error = assert_error(response, 500, "internal_error")
        rid = response.headers["x-request-id"]
        assert rid in error["message"] and error["type"] == "server_error"
        for leak in ("Traceback", "secret", "RuntimeError", ".py", "File "):
            assert leak not in response.text
        assert "secret detail" in caplog.text and rid in caplog.text  # the log has it all


def test_a_crash_mid_stream_is_an_error_event(served):
    client, engine = served

    async def broken(name, ids, sampling):
        yield Chunk("hel", [1], None)
        raise RuntimeError("secret")

    engine.generate = broken
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(response.text)
    error = json.loads(events[-2])["error"]
    assert error["code"] == "internal_error" and "secret" not in response.text and events[-1] == "[DONE]"


# ----------------------------------------------------------------------------- metrics, CORS, schema

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:\\.|[^"\\])*"'
METRIC_LINE = re.compile(rf'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{(?P<labels>{LABEL}(?:,{LABEL})*)?\}})? '
                         r'(?P<value>-?[0-9.]+(?:e[+-]?[0-9]+)?|NaN|[+-]Inf)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[str, float]]]:
    """Prometheus text format 0.0.4, strictly: HELP/TYPE lines, then samples of declared families."""
    assert text.endswith("\n")
    families: dict[str, str] = {}
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in families
            families[name] = kind
            continue
        match = METRIC_LINE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = next(f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in families)
        samples.setdefault(family, []).append((match["labels"] or "", float(match["value"])))
    return samples


def test_metrics_are_prometheus_text(served):
    client, _ = served
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={**CHAT, "model": "../../x"})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(response.text)
    requests = dict(samples["deltatune_requests_total"])
    assert requests['endpoint="/v1/chat/completions",model="chat",status="200"'] == 1
    assert requests['endpoint="/v1/chat/completions",model="",status="404"'] == 1  # no label from the request
    assert dict(samples["deltatune_completion_tokens_total"])['model="chat"'] == 2
    buckets = [v for labels, v in samples["deltatune_request_duration_seconds"] if 'le="+Inf"' in labels]
    assert buckets and all(v >= 1 for v in buckets)
    assert dict(samples["deltatune_batch_size"])['op="classify",le="4"'] == 5
    assert dict(samples["deltatune_engine_queue_depth"])[""] == 1
    assert dict(samples["deltatune_engine_tokens_generated_total"])[""] == 12
    assert dict(samples["deltatune_engine_requests_total"])['model="chat"'] == 3


def test_metrics_read_other_stats_shapes_and_never_fail():
    from deltatune.serve.metrics import Metrics

    text = Metrics().render({"batch_sizes": {1: 3, 4: 2}, "per_model": {"chat": {"prompt_tokens": 7}},
                             "queue_depth": 2, "odd": [1, 2], "broken": {"x": "y"}, "label": 'a"b\\c\n'})
    samples = parse_prometheus(text)
    assert dict(samples["deltatune_batch_size"])['le="4"'] == 5
    assert dict(samples["deltatune_engine_prompt_tokens_total"])['model="chat"'] == 7
    assert Metrics().render({"batch_sizes": {"generate": {"two": 1}}, "queue_depth": 1}).count("queue_depth") == 3
    metrics = Metrics()
    metrics.observe('/v1/x"\n', 'name"with\\odd\nchars', 200, 0.1)
    parse_prometheus(metrics.render({}))  # label values are escaped


def test_cors_is_off_unless_configured(tmp_path):
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with TestClient(create_app(FakeEngine(), make_settings(tmp_path)), headers=auth()) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.get("/v1/models", headers=preflight).headers
    settings = make_settings(tmp_path / "cors")
    settings.cors_origins = ["https://app.example.com"]
    with TestClient(create_app(FakeEngine(), settings), headers=auth()) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example.com"
        response = client.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers


def test_without_keys_everything_but_admin_is_open(tmp_path):
    with TestClient(create_app(FakeEngine(), make_settings(tmp_path, keys=False))) as client:
        assert client.get("/v1/models").status_code == 200
        assert_error(client.post("/admin/reload"), 403, "admin_only")
        schema = client.get("/openapi.json").json()
        assert "securitySchemes" not in schema.get("components", {})


def test_openapi_schema_declares_every_error(served):
    client, _ = served
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"].lower() == "bearer"
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) == {"200", "400", "401", "403", "404", "408", "413", "429", "500", "503"}
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert all("422" not in op["responses"] for item in schema["paths"].values() for op in item.values())
    assert "HTTPValidationError" not in json.dumps(schema)
    assert "security" not in schema["paths"]["/health"]["get"]


# ----------------------------------------------------------------------------- config

def test_config_reads_and_applies_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    completed_run(tmp_path / "runs" / "a")
    completed_run(tmp_path / "runs" / "b")
    config = tmp_path / "serve.yaml"
    config.write_text("runs:\n  sentiment: runs/a\nport: 9000\nlimits:\n  max_n: 2\n  request_timeout_s: 5\n")
    cfg = load_serve_config(config, ["other=runs/b"], host="::1")
    assert cfg.runs == {"sentiment": str(tmp_path / "runs/a"), "other": str(tmp_path / "runs/b")}
    assert (cfg.host, cfg.port, cfg.limits.max_n, cfg.limits.request_timeout_s) == ("::1", 9000, 2, 5.0)
    assert cfg.limits.max_tokens == 512 and cfg.batching.max_batch == 16 and cfg.cors_origins == []


@pytest.mark.parametrize("text, problem", [
    ("runs: {a: runs/a}\nprot: 1\n", "prot: unknown key (did you mean 'port'?)"),
    ("runs: {a: runs/a}\nlimits: {max_token: 3}\n", "limits.max_token: unknown key (did you mean 'max_tokens'?)"),
    ("runs: {a: runs/a}\nport: eighty\n", "port: expected a whole number"),
    ("runs: {a: runs/a}\nport: 70000\n", "port: must be 0 to 65535"),
    ("runs: {a: runs/a}\nlimits: {max_n: 0}\n", "limits.max_n: must be at least 1"),
    ("runs: {a: runs/a}\ncors_origins: [https://x.com/path]\n", "is not an origin"),
    ("runs: {a: runs/a}\nport: 1\nport: 2\n", "port: given twice"),
    ("runs: {}\n", "runs: none given"),
    ("runs: {a: runs/a}\nhost: 0.0.0.0\n", "host: 0.0.0.0 is not a loopback address and no api_keys file"),
    ("runs: {a: runs/a}\napi_keys: nokeys.yaml\n", "api_keys: config file nokeys.yaml does not exist"),
    ("- a\n", "the top level must be a mapping of keys (runs:, host:"),
])
def test_config_problems_are_listed(tmp_path, monkeypatch, text, problem):
    monkeypatch.chdir(tmp_path)
    completed_run(tmp_path / "runs" / "a")
    (tmp_path / "serve.yaml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_serve_config("serve.yaml")
    assert problem in str(exc.value)


@pytest.mark.parametrize("name", ["../x", ".hidden", "base", "Base", "a/b", "a b", "x" * 65, "", "run\x00", "é"])
def test_run_names_must_be_simple(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    completed_run(tmp_path / "runs" / "a")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"runs": {name: "runs/a"}}))
    with pytest.raises(ConfigError, match="letters, digits"):
        load_serve_config(path)
    if name:
        with pytest.raises(ConfigError, match="letters, digits"):
            load_serve_config(None, [f"{name}=runs/a"])


def test_run_dirs_must_be_completed_runs_named_with_their_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    failed = tmp_path / "runs" / "failed"
    failed.mkdir(parents=True)
    (failed / "status.json").write_text(json.dumps({"status": "failed"}))
    plain = tmp_path / "runs" / "plain"
    plain.mkdir()
    with pytest.raises(ConfigError) as exc:
        load_serve_config(None, ["f=runs/failed", "p=runs/plain", "m=runs/missing"])
    problems = exc.value.problems
    assert any(p.startswith("runs.f: runs/failed: run is failed, not completed") for p in problems), problems
    assert any(p.startswith("runs.p: runs/plain: run is missing") for p in problems), problems
    assert any(p.startswith("runs.m: runs/missing is not a directory") for p in problems), problems
    with pytest.raises(ConfigError, match="expected NAME=RUN_DIR"):
        load_serve_config(None, ["just-a-path"])


def test_binding_beyond_loopback_needs_keys_or_the_explicit_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    completed_run(tmp_path / "runs" / "a")
    for host in ("127.0.0.1", "127.8.9.1", "::1", "localhost"):
        assert load_serve_config(None, ["a=runs/a"], host=host).host == host
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.com"):
        with pytest.raises(ConfigError, match="not a loopback address"):
            load_serve_config(None, ["a=runs/a"], host=host)
        assert load_serve_config(None, ["a=runs/a"], host=host, insecure_no_auth=True).host == host
    keys = write_keys(tmp_path / "keys.yaml")
    assert load_serve_config(None, ["a=runs/a"], host="0.0.0.0", api_keys=str(keys)).api_keys == str(keys)


def test_explain_lists_every_key_with_help():
    text = explain()
    for key in ("runs", "host", "port", "api_keys", "cors_origins", "limits.max_body_bytes", "limits.max_prompt_tokens",
                "limits.max_tokens", "limits.max_n", "limits.request_timeout_s", "limits.rate_limit_per_minute",
                "limits.queue_size", "batching.max_batch", "batching.batch_wait_ms"):
        assert re.search(rf"^{re.escape(key)} = .+\n    \S", text, re.M), key


def test_cli_explain_and_hash_key(capsys, monkeypatch):
    import io

    from deltatune.cli import main

    assert main(["serve", "--explain"]) == 0
    assert "limits.max_body_bytes = 1048576" in capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("sk-secret\n"))
    assert main(["serve", "--hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("sk-secret")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["serve", "--hash-key"]) == 2
    assert main(["serve"]) == 2
    assert "runs: none given" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a real server

@pytest.fixture
def live_server(tmp_path):
    """uvicorn on a free loopback port, in a thread: (base URL, engine)."""
    engine = FakeEngine()
    with serving(engine, make_settings(tmp_path), start_seconds=30) as url:
        yield url, engine


def test_the_official_openai_client_against_a_real_server(live_server):
    import openai

    url, _ = live_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["alice"], max_retries=0, timeout=30)
    assert {"chat", "sentiment", "embedder"} <= {m.id for m in client.models.list()}
    assert client.models.retrieve("sentiment").id == "sentiment"

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model="chat", messages=messages, max_tokens=5, temperature=0, seed=1)
    assert reply.choices[0].message.content == "hello world" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 2 and reply.usage.total_tokens == reply.usage.prompt_tokens + 2

    stream = client.chat.completions.create(model="chat", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello world"
    assert chunks[-1].usage.completion_tokens == 2

    text = client.completions.create(model="base", prompt="once upon", max_tokens=1)
    assert text.choices[0].text == "hello" and text.choices[0].finish_reason == "length"
    streamed = client.completions.create(model="base", prompt="once upon", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == "hello world"

    vectors = client.embeddings.create(model="embedder", input=["ab", "abcd"])  # the client asks for base64
    assert [d.embedding for d in vectors.data] == [[2.0, 1.0, -0.5], [4.0, 1.0, -0.5]]
    assert client.embeddings.create(model="embedder", input="ab", encoding_format="float").data[0].embedding[0] == 2.0

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="../../etc/passwd", messages=messages)
    assert "chat" in missing.value.message and missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=messages, n=99)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["bob"], max_retries=0).chat.completions.create(
            model="chat", messages=messages)


def test_a_real_server_refuses_big_bodies_and_frees_a_stream_the_client_left(live_server):
    import httpx

    url, engine = live_server
    headers = {**auth(), "Content-Type": "application/json"}

    def body():  # chunked transfer: no Content-Length to check, the server counts what arrives
        yield b'{"model": "chat", "messages": [{"role": "user", "content": "'
        for _ in range(300):
            yield b"x" * 8192

    response = httpx.post(f"{url}/v1/chat/completions", content=body(), headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{" + b" " * 1_100_000 + b"}", headers=headers)
    assert response.status_code == 413

    engine.token_delay, engine.words = 0.1, [" tok"] * 200  # 20 s if nobody stopped it
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 500},
                      headers=headers, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # held: a dropped iterator would close the response at once
        assert next(lines).startswith("data: ")
        assert engine.in_flight == 1
    deadline = time.monotonic() + 3  # the client hung up: the generation is stopped, its slot freed
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0


SERVER_SCRIPT = """
import sys
from deltatune.serve.config import load_serve_config
from deltatune.serve.server import run
from tests.unit.test_serve_http import FakeEngine

def read():
    return load_serve_config(sys.argv[1])

sys.exit(run(FakeEngine(token_delay=float(sys.argv[2])), read(), reload=read))
"""


def test_sighup_reloads_and_sigterm_drains_then_exits_0(tmp_path):
    """A subprocess serving a slow fake engine: SIGHUP applies an edited config; SIGTERM lets a stream in
    flight finish, refuses new requests, and exits 0."""
    import httpx

    runs = {"chat": str(completed_run(tmp_path / "runs" / "chat"))}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"runs": runs, "port": 0}))
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(config), "0.4"], cwd=ROOT, env=env,
                                stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while "deltatune serve: http" not in out.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        line = out.read_text()
        assert "deltatune serve: http://127.0.0.1:" in line, (line, err.read_text())
        url = re.search(r"(http://\S+)/v1", line).group(1)
        assert "no API keys" in line and "chat" in line

        runs["fresh"] = str(completed_run(tmp_path / "runs" / "fresh"))
        config.write_text(yaml.safe_dump({"runs": runs, "port": 0}))
        proc.send_signal(signal.SIGHUP)
        for _ in range(200):
            names = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
            if "fresh" in names:
                break
            time.sleep(0.05)
        assert "fresh" in names and "sentiment" not in names  # sentiment is not in the config

        received: list[str] = []
        first = threading.Event()

        def stream():
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                              json={**CHAT, "stream": True}) as response:
                for line in response.iter_lines():
                    if line:
                        received.append(line)
                        first.set()

        thread = threading.Thread(target=stream)
        thread.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        try:
            refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=10)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass  # already stopped listening
        thread.join(30)
        assert proc.wait(30) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [line[len("data: "):] for line in received]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if json.loads(e)["choices"])
    assert text == "hello world"  # the stream in flight finished
    assert "Traceback" not in err.read_text()


# ----------------------------------------------------------------------------- the OpenAPI schema holds

# A positive case names a model of the right kind (a random name would only ever test the 404).
MODEL_FOR = {"/v1/chat/completions": "chat", "/v1/completions": "base", "/v1/embeddings": "embedder",
             "/v1/classify": "sentiment", "/v1/score": "reward"}


def _schema_app():
    """The app schemathesis drives (built at import: its pytest integration reads the schema then)."""
    engine = FakeEngine()
    keys = Keys({"ops": Caller("ops", None, 0, admin=True)}, {"ops": bytes.fromhex(hash_key(KEYS["ops"]))})
    runs = {s.name: s.run for s in engine.served() if s.run}  # /admin/reload finds nothing to change
    app = create_app(engine, ServeConfig(runs=runs, limits=Limits(rate_limit_per_minute=0)), keys=keys)
    app.state.serve.started = True  # the ASGI transport runs no lifespan
    return app


# Not schemathesis.pytest.from_fixture: with pytest 9 it fails (it sets the private Node._nodeid).
_app = _schema_app()


async def _without_lifespan(scope, receive, send):
    """schemathesis ends an app's lifespan between tests (the app would then drain: 503): run none."""
    if scope["type"] != "lifespan":
        await _app(scope, receive, send)


schema = schemathesis.openapi.from_dict(_app.openapi())
schema.app = _without_lifespan


@schema.parametrize()
@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_responses_match_the_openapi_schema(case):
    """No 5xx, every status declared, every body and header as the schema says; invalid input is refused,
    valid input accepted; a declared key is enforced."""
    if case.meta is not None and case.meta.generation.mode.is_positive:
        if isinstance(case.body, dict) and case.path in MODEL_FOR and "model" in case.body:
            case.body["model"] = MODEL_FOR[case.path]
        if isinstance(case.body, dict) and case.path in ("/admin/load", "/admin/unload") and "name" in case.body:
            case.body["name"] = "chat" if case.path == "/admin/load" else "reward"  # /admin/reload brings it back
            case.body.pop("run", None)
        if case.path == "/v1/models/{model}" and case.path_parameters:
            case.path_parameters["model"] = "ner"
    # /v1/score: a valid body may pair 2 prompts with 3 responses, which is 400 (the schema cannot say it)
    excluded = [positive_data_acceptance] if case.path == "/v1/score" else []
    response = case.call_and_validate(headers=auth("ops"), excluded_checks=excluded)
    mode = "positive" if case.meta is None or case.meta.generation.mode.is_positive else "negative"
    SCHEMA_STATUSES.setdefault((case.operation.method.upper(), case.path), set()).add((mode, response.status_code))


SCHEMA_STATUSES: dict[tuple[str, str], set[tuple[str, int]]] = {}


def test_schemathesis_reached_successes_and_refusals():
    """The run above was not all 404s and 400s: every operation answered 2xx, the POSTs refused bad bodies."""
    if not SCHEMA_STATUSES:
        pytest.skip("runs after test_responses_match_the_openapi_schema")
    for (method, path), seen in SCHEMA_STATUSES.items():
        assert any(mode == "positive" and 200 <= status < 300 for mode, status in seen), (method, path, seen)
        if method == "POST" and path != "/admin/reload":
            assert ("negative", 400) in seen, (method, path, seen)
