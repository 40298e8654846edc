"""The studio's Playground through the ASGI app: a run trained here on the tiny Llama and its base model answer
the same conversation, each streamed in pieces (server-sent events), the run's answer the tokens `deltatune
predict` gives; a run the engine cannot serve says why in plain words; the chat POST needs its CSRF token and
refuses what is not a listed run. tests/unit/test_studio_labs_browser.py chats in a real browser."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from deltatune import registry_db as db
from deltatune.inference import load_run, predict
from deltatune.studio.app import create_app
from deltatune.studio.settings import Settings
from tests.conftest import qa_rows, write_jsonl
from tests.helpers import config, randomize
from tests.studio_text import text_run

pytestmark = pytest.mark.filterwarnings("ignore:Position ids are not supported")
QUESTION = "what is 1 and 2"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama):
    """A LoRA run on the tiny Llama (its delta randomized so that it answers unlike its base), recorded in a
    registry of this module's own, and a run the registry lists whose folder holds nothing to serve."""
    import torch

    from deltatune.train.run import train

    base = tmp_path_factory.mktemp("playground")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_REGISTRY", str(base / "registry.sqlite"))
        qa = write_jsonl(base / "qa.jsonl", qa_rows(16))
        run = train(config(tiny_llama, "causal_lm", "lora", qa, base / "runs" / "lora", "train.max_steps=2",
                           "train.warmup_ratio=0"))
        randomize(run.path, 3)
        torch.set_flush_denormal(False)  # training turned it on; `deltatune serve` trains nothing
        ids = {"lora": db.import_run(run.path), "empty": text_run(base / "runs" / "empty", tiny_llama)}
    return {"base": base, "ids": ids, "path": run.path}


@pytest.fixture
def client(trained, monkeypatch):
    monkeypatch.setenv("DELTATUNE_REGISTRY", str(trained["base"] / "registry.sqlite"))
    app = create_app(Settings(runs=trained["base"] / "runs", data_root=trained["base"], allowed_hosts=("testserver",)))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def csrf(page: str) -> str:
    return re.search(r"name='csrf-token' content='([0-9a-f]+)'", page).group(1)


def chat(client, model: str, token: str | None, messages=None, **options) -> tuple[int, list[tuple[str, dict]]]:
    body = {"model": model, "messages": messages or [{"role": "user", "content": QUESTION}], "max_tokens": 8,
            "temperature": 0, **options}
    headers = {"X-CSRF-Token": token} if token else {}
    response = client.post("/playground/chat", json=body, headers=headers)
    events = [(m.group(1), json.loads(m.group(2))) for m in re.finditer(r"event: (\w+)\ndata: (.*)\n", response.text)]
    return response.status_code, events


def test_the_page_puts_the_base_and_the_run_side_by_side(client, trained):
    page = client.get("/playground", params={"run": trained["ids"]["lora"]}).text
    run_id = trained["ids"]["lora"]
    assert f'data-model="base:{run_id}"' in page and f'data-model="run:{run_id}"' in page
    assert "Base model: tiny-llama" in page and "Your message" in page
    two = client.get("/playground", params={"run": trained["ids"]["lora"], "run2": trained["ids"]["empty"],
                                            "base": "0"}).text
    assert two.count('class="pg-col"') == 2 and "Base model:" not in two


def test_base_and_run_stream_their_own_answers(client, trained):
    token = csrf(client.get("/playground").text)
    status, events = chat(client, f"run:{trained['ids']['lora']}", token)
    assert status == 200 and events[0][0] == "loading" and events[-1][0] == "done"
    pieces = [e["text"] for name, e in events if name == "text"]
    assert len(pieces) >= 2 and events[-1][1]["pieces"] == len(pieces)  # streamed, not one block
    expected = predict(load_run(trained["path"]), [QUESTION], max_new_tokens=8)[0]["response"]
    assert "".join(pieces).strip() == expected.strip()
    _, base_events = chat(client, f"base:{trained['ids']['lora']}", token)
    base_answer = "".join(e["text"] for name, e in base_events if name == "text")
    assert base_events[-1][0] == "done" and base_answer.strip() != expected.strip()
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": expected},
               {"role": "user", "content": "hello"}]
    assert chat(client, f"run:{trained['ids']['lora']}", token, history)[1][-1][0] == "done"


def test_a_run_that_cannot_be_served_says_why(client, trained):
    token = csrf(client.get("/playground").text)
    status, events = chat(client, f"run:{trained['ids']['empty']}", token)
    assert status == 200 and events[-1][0] == "error"
    message = events[-1][1]["message"]
    assert message.startswith("This run cannot answer here:") and "Traceback" not in message


def test_the_chat_needs_its_token_and_a_listed_run(client, trained):
    run = trained["ids"]["lora"]
    assert chat(client, f"run:{run}", None)[0] == 403
    token = csrf(client.get("/playground").text)
    assert chat(client, "run:0123abcd", token)[0] == 404
    assert chat(client, "/etc/passwd", token)[0] == 400
    assert chat(client, f"run:{run}", token, [{"role": "system", "content": "x"}])[0] == 400
    assert chat(client, f"run:{run}", token, max_tokens=10_000)[0] == 400
    big = client.post("/playground/chat", content=b"x" * 100_000, headers={"X-CSRF-Token": token})
    assert big.status_code == 413 and "Traceback" not in big.text


def test_without_runs_the_page_says_how_to_get_one(tmp_path):
    app = create_app(Settings(runs=tmp_path / "runs", data_root=tmp_path, allowed_hosts=("testserver",)))
    page = TestClient(app).get("/playground").text
    assert "No completed run that writes text yet" in page


def test_the_engine_stops_with_the_studio(trained, monkeypatch):
    """Its worker thread runs torch: left running at interpreter exit, it would abort the process."""
    monkeypatch.setenv("DELTATUNE_REGISTRY", str(trained["base"] / "registry.sqlite"))
    app = create_app(Settings(runs=trained["base"] / "runs", data_root=trained["base"], allowed_hosts=("testserver",)))
    with TestClient(app, raise_server_exceptions=False) as c:
        status, _ = chat(c, f"run:{trained['ids']['lora']}", csrf(c.get("/playground").text))
        assert status == 200 and not app.state.playground.engine.scheduler.closed
    assert app.state.playground.engine.scheduler.closed
