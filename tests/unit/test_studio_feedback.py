"""The studio's Feedback page through the ASGI app, on the tiny Llama: a session writes exactly the rows
`deltatune feedback` writes for the same answers (pairs, rankings, skips, thumbs), as they are given; starting it
again skips what was answered; POSTs need their CSRF token; the prompts and output files stay under the data
root; a wrong or stale answer is a plain 400/409 page. tests/unit/test_studio_labs_browser.py clicks through it."""

from __future__ import annotations

import io
import json
import re

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from deltatune.data.preferences import load_preferences, load_thumbs
from deltatune.rlhf.feedback import feedback
from deltatune.studio.app import create_app
from deltatune.studio.settings import Settings
from tests.studio_text import PROMPTS, SAMPLING, session_id, text_run, wait_state, write_prompts
from tests.unit.test_feedback import Person


@pytest.fixture
def world(tmp_path, tiny_llama):
    data = tmp_path / "data"
    write_prompts(data)
    run_id = text_run(tmp_path / "runs" / "chat", tiny_llama)
    app = create_app(Settings(runs=tmp_path / "runs", data_root=data, allowed_hosts=("testserver",),
                              poll_seconds=0.05))
    with TestClient(app, raise_server_exceptions=False) as client:  # its end stops the sampling threads
        yield {"client": client, "data": data, "model": f"base:{run_id}", "tiny": tiny_llama}


def csrf(page: str) -> str:
    return re.search(r"name='csrf-token' content='([0-9a-f]+)'", page).group(1)


def start(world, **fields):
    c = world["client"]
    form = {"csrf_token": csrf(c.get("/feedback").text), "prompts": "prompts.jsonl", "model": world["model"],
            "mode": "pick", "k": "2", "out": "feedback/prefs.jsonl", **SAMPLING, **fields}
    return c.post("/feedback/start", data=form, follow_redirects=False)


def answer(world, sid: str, text: str) -> None:
    c = world["client"]
    part = wait_state(c, sid)
    index = re.search(r'name="index" value="(\d+)"', part).group(1)
    token = csrf(c.get(f"/feedback/s/{sid}").text)
    done = c.post(f"/feedback/s/{sid}/answer", data={"csrf_token": token, "index": index, "choice": text},
                  follow_redirects=False)
    assert done.status_code == 303, done.text[:2000]


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def command(world, out, *answers: str, k: int = 2, thumbs: bool = False) -> None:
    """The same session with `deltatune feedback` and a scripted person."""
    sampling = {"max_new_tokens": 6, "temperature": 0.8, "top_p": 0.95, "seed": 0}
    feedback(world["data"] / "prompts.jsonl", str(world["tiny"]), out, None if thumbs else k, thumbs=thumbs,
             ask=Person(*answers), console=Console(file=io.StringIO()), **sampling)


def test_the_page_offers_the_prompt_files_and_the_models(world):
    page = world["client"].get("/feedback").text
    assert "prompts.jsonl" in page and world["model"] in page and "Start labeling" in page
    assert 'aria-current=page>Feedback' in page


def test_answers_are_the_rows_the_command_writes_appended_as_given(world, tmp_path):
    sid = session_id(start(world))
    out = world["data"] / "feedback" / "prefs.jsonl"
    answer(world, sid, "2")
    assert len(lines(out)) == 1  # written at once, before the next prompt is answered
    answer(world, sid, "t")
    answer(world, sid, "1")
    assert len(lines(out)) == 2 and len(lines(out.with_name("prefs.skipped.jsonl"))) == 1
    command(world, tmp_path / "cli.jsonl", "2", "t", "1", "q")
    assert lines(out) == lines(tmp_path / "cli.jsonl")
    assert lines(out.with_name("prefs.skipped.jsonl")) == lines(tmp_path / "cli.skipped.jsonl")
    prefs = load_preferences(out)
    assert [p.prompt for p in prefs] == [PROMPTS[0], PROMPTS[2]]
    assert "3</b> of 4 prompts done" in wait_state(world["client"], sid)


def test_starting_again_goes_on_where_the_file_stops(world):
    first = session_id(start(world))
    answer(world, first, "1")
    answer(world, first, "s")
    world["client"].app.state.labelings = type(world["client"].app.state.labelings)()  # as after a restart
    again = session_id(start(world))
    assert again != first
    part = wait_state(world["client"], again)
    assert "2</b> of 4 prompts done" in part and "1 answered · 1 skipped" in part
    assert "Prompt 3 of 4" in part and PROMPTS[2] in part
    answer(world, again, "2")
    answer(world, again, "1")
    assert "All 4 prompts are done" in wait_state(world["client"], again, ("done",))
    assert [r["source"]["index"] for r in lines(world["data"] / "feedback" / "prefs.jsonl")] == [0, 2, 3]
    thumbs_here = start(world, mode="thumbs")  # the command's check: a file holds one kind of row
    assert thumbs_here.status_code == 400 and "the file holds pairs or rankings" in thumbs_here.text


def test_a_ranking_of_three_and_thumbs_write_what_reward_dpo_and_kto_read(world, tmp_path):
    sid = session_id(start(world, mode="rank", k="3", out="feedback/ranked.jsonl"))
    answer(world, sid, "3 1 2")
    command(world, tmp_path / "cli.jsonl", "3 1 2", "q", k=3)
    ranked = lines(world["data"] / "feedback" / "ranked.jsonl")
    assert ranked == lines(tmp_path / "cli.jsonl") and ranked[0]["ranking"] == [2, 0, 1]
    assert len(load_preferences(world["data"] / "feedback" / "ranked.jsonl")[0].responses) == 3
    thumbs = session_id(start(world, mode="thumbs", out="feedback/thumbs.jsonl"))
    answer(world, thumbs, "u")
    answer(world, thumbs, "d")
    rows = load_thumbs(world["data"] / "feedback" / "thumbs.jsonl")
    assert [(t.prompt, t.desirable) for t in rows] == [(PROMPTS[0], True), (PROMPTS[1], False)]
    command(world, tmp_path / "cli-thumbs.jsonl", "u", "d", "q", thumbs=True)
    assert lines(world["data"] / "feedback" / "thumbs.jsonl") == lines(tmp_path / "cli-thumbs.jsonl")


def test_posts_need_their_csrf_token(world):
    c = world["client"]
    assert c.post("/feedback/start", data={"prompts": "prompts.jsonl", "model": world["model"]}).status_code == 403
    assert c.post("/feedback/start", data={"csrf_token": "0" * 40, "prompts": "prompts.jsonl"}).status_code == 403
    sid = session_id(start(world))
    wait_state(c, sid)
    refused = c.post(f"/feedback/s/{sid}/answer", data={"index": "0", "choice": "1"})
    assert refused.status_code == 403 and not (world["data"] / "feedback" / "prefs.jsonl").exists()


@pytest.mark.parametrize("field,value,status", [("prompts", "../outside.jsonl", 400), ("prompts", "/etc/passwd", 400),
                                                ("prompts", "link/outside.jsonl", 403),
                                                ("out", "../../elsewhere.jsonl", 400), ("out", "link/out.jsonl", 403)])
def test_files_stay_under_the_data_root(world, tmp_path, field, value, status):
    outside = tmp_path / "outside"
    write_prompts(outside, "outside.jsonl")
    (world["data"] / "link").symlink_to(outside)
    refused = start(world, **{field: value})
    assert refused.status_code == status and "What to do:" in refused.text
    assert not (outside / "out.jsonl").exists() and not (tmp_path / "elsewhere.jsonl").exists()


def test_bad_settings_and_stale_answers_are_plain_pages(world):
    c = world["client"]
    bad = start(world, k="9", temperature="hot", model="run:0000")
    assert bad.status_code == 400 and "Start labeling" in bad.text
    for said in ("k: give a whole number from 2 to 4", "temperature: give a number",
                 "is not one of the completed text-writing runs"):
        assert said in bad.text
    sid = session_id(start(world))
    wait_state(c, sid)
    token = csrf(c.get(f"/feedback/s/{sid}").text)
    wrong = c.post(f"/feedback/s/{sid}/answer", data={"csrf_token": token, "index": "0", "choice": "7"})
    assert wrong.status_code == 400 and "numbered 1 to 2" in wrong.text and "quit" not in wrong.text
    stale = c.post(f"/feedback/s/{sid}/answer", data={"csrf_token": token, "index": "3", "choice": "1"})
    assert stale.status_code == 409 and "Traceback" not in stale.text
    assert c.get("/feedback/s/ffffffffffff").status_code == 404
