"""`deltatune serve` end to end on tiny models: the real engine behind a real uvicorn server, driven by the
official openai client and httpx. Answers equal `deltatune predict` (greedy tokens, class probabilities to
1e-5); a merged export of a LoRA run serves the same tokens as the unmerged delta; concurrent requests for
different deltas each get their own delta's answer."""

from __future__ import annotations

import asyncio
import json
import pytest

from deltatune.cli import main
from deltatune.data.examples import conversation_ids
from deltatune.inference import load_run, predict
from deltatune.serve.config import Limits, ServeConfig
from deltatune.train.run import train
from tests.conftest import qa_rows, write_jsonl
from tests.helpers import config, randomize, serving

QUESTIONS = ["what is 1 and 2", "hello", "what is 7", "my name is what"]
pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported")


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e-runs")
    qa = write_jsonl(root / "qa.jsonl", qa_rows(24))
    from tests.conftest import sentiment_rows, write_csv
    cls = write_csv(root / "cls.csv", sentiment_rows(24))
    quick = ["train.max_steps=2", "train.warmup_ratio=0"]
    out = {}
    for name, (model, task, method, data) in {"chat-a": (tiny_llama, "causal_lm", "lora", qa),
                                              "chat-b": (tiny_llama, "causal_lm", "lora", qa),
                                              "chat-ia3": (tiny_llama, "causal_lm", "ia3", qa),
                                              "sentiment": (tiny_bert, "classification", "lora", cls)}.items():
        out[name] = train(config(model, task, method, data, root / name, *quick)).path
    for seed, name in enumerate(out):
        randomize(out[name], seed)  # different deltas answer differently
    merged = root / "chat-a-merged"
    assert main(["export", str(out["chat-a"]), "--merge", "--out", str(merged)]) == 0
    out["merged-root"] = merged
    return out


@pytest.fixture(scope="module")
def server(runs):
    from deltatune.serve.engine import Engine
    import torch

    # Training (the runs fixture) turned flush-denormal on for this thread, and a new thread inherits it:
    # the server would then read a subnormal number (say top_p 5e-324) as 0. `deltatune serve` trains nothing.
    torch.set_flush_denormal(False)
    served = {k: str(v) for k, v in runs.items() if k != "merged-root"}
    settings = ServeConfig(runs=served, limits=Limits(rate_limit_per_minute=0))
    with serving(Engine(settings.runs), settings) as url:
        yield url


def _greedy(run_dir, prompts, n=8):
    return [p["response"] for p in predict(load_run(run_dir), prompts, max_new_tokens=n)]


def test_openai_client_answers_equal_deltatune_predict(server, runs):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    names = {m.id for m in client.models.list()}
    assert {"chat-a", "chat-b", "chat-ia3", "sentiment"} <= names and any(n.startswith("base") for n in names)
    for name in ("chat-a", "chat-ia3"):
        expected = _greedy(runs[name], QUESTIONS)
        got = [client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}],
                                              max_tokens=8, temperature=0).choices[0].message.content.strip()
               for q in QUESTIONS]
        assert got == expected, name
    streamed = client.chat.completions.create(model="chat-b", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                              max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == \
        _greedy(runs["chat-b"], QUESTIONS[:1])[0]

    import httpx
    texts = ["good great film", "the plot was dull and boring"]
    body = httpx.post(f"{server}/v1/classify", json={"model": "sentiment", "input": texts}, timeout=60).json()
    reference = predict(load_run(runs["sentiment"]), texts)
    for got, want in zip(body["data"], reference):
        assert got["label"] == want["label"]
        assert all(abs(got["probabilities"][k] - v) <= 1e-5 for k, v in want["probabilities"].items())


def test_a_merged_export_serves_the_same_tokens_as_the_unmerged_delta(server, runs):
    """The merged folder, loaded as a plain model, greedy-decodes what the server answers for the delta."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import openai

    merged = runs["merged-root"]
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    chat_template = load_run(runs["chat-a"]).cfg.data.chat_template
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    for q in QUESTIONS:
        messages = [{"role": "user", "content": q}]
        ids = torch.tensor([conversation_ids(tok, messages, chat_template)])
        served = client.chat.completions.create(model="chat-a", messages=messages, max_tokens=8, temperature=0)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == \
            served.choices[0].message.content.strip(), q


def test_concurrent_mixed_delta_requests_each_get_their_own_answer(server, runs):
    import httpx

    alone = {name: _greedy(runs[name], QUESTIONS) for name in ("chat-a", "chat-b", "chat-ia3")}
    assert alone["chat-a"] != alone["chat-b"]  # the deltas differ, so a mix-up would show

    async def ask(client, name, q):
        r = await client.post("/v1/chat/completions", json={"model": name, "max_tokens": 8, "temperature": 0,
                                                            "messages": [{"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        return name, q, r.json()["choices"][0]["message"]["content"].strip()

    async def everything():
        async with httpx.AsyncClient(base_url=server, timeout=120) as client:
            return await asyncio.gather(*(ask(client, name, q) for _ in range(2) for name in alone for q in QUESTIONS))

    for name, q, answer in asyncio.run(everything()):
        assert answer == alone[name][QUESTIONS.index(q)], (name, q)
    metrics = httpx.get(f"{server}/metrics").text
    assert "deltatune" in metrics and "batch" in metrics


def test_traversal_and_unknown_names_are_404_without_touching_files(server):
    import httpx

    for name in ("../../etc/passwd", "/etc/passwd", "chat-a/../chat-b", "nosuch"):
        r = httpx.post(f"{server}/v1/chat/completions", json={"model": name, "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        assert r.status_code == 404 and "chat-a" in json.dumps(r.json()), name


def test_the_real_engine_answers_as_the_openapi_schema_says(server):
    """schemathesis on the live server with the real engine (bounded: 12 examples an operation): no 5xx,
    every response as the schema declares it. Valid bodies get a real model of the right kind."""
    import httpx
    import schemathesis
    import torch
    from hypothesis import HealthCheck, given, settings

    torch.set_flush_denormal(False)  # the module's training turned it on; hypothesis cannot draw floats then
    schema = schemathesis.openapi.from_dict(httpx.get(f"{server}/openapi.json").json())
    names = {m["id"]: m for m in httpx.get(f"{server}/v1/models").json()["data"]}
    model_for = {"/v1/chat/completions": "chat-a", "/v1/completions": "chat-b", "/v1/classify": "sentiment",
                 "/v1/embeddings": next(n for n, m in names.items() if m.get("kind") == "embed")}
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/admin") or operation.path == "/v1/score":  # no admin key; no reward run
            continue

        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and case.path in model_for and "model" in case.body:
                case.body["model"] = model_for[case.path]
            if isinstance(case.body, dict) and "max_tokens" in case.body and isinstance(case.body["max_tokens"], int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 4)  # keep it quick
            response = case.call(base_url=server, timeout=60)
            assert response.status_code < 500, (case.path, response.status_code, response.text[:300])
            case.validate_response(response)

        check()
        checked += 1
    assert checked >= 6
