"""The Feedback and Playground pages in a real browser (Playwright on Debian's chromium), used as a person would,
on a LoRA run trained here on the tiny Llama: label preference pairs by clicking and by keys and find them with
the reader reward/DPO/PPO use; rank three responses by dragging and by keys; give thumbs for KTO; chat with the
base and the run side by side and see both answers streamed. Screenshots at 1280x800 and 390x844 and axe-core
as in test_studio_browser.py (its fixtures and check are reused, not copied)."""

from __future__ import annotations

import json

import pytest

from deltatune import registry_db as db
from deltatune.data.preferences import load_preferences, load_thumbs
from deltatune.studio.settings import Settings
from tests.conftest import qa_rows, write_jsonl
from tests.helpers import config, randomize
from tests.studio_runs import studio
from tests.studio_text import PROMPTS, write_prompts
from tests.studio_browser import CHROMIUM
from tests.studio_browser import screenshots_and_axe as check

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install installs it)"),
              pytest.mark.filterwarnings("ignore:Position ids are not supported")]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    import torch

    from deltatune.train.run import train

    base = tmp_path_factory.mktemp("studio-labs")
    registry = base / "registry.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_REGISTRY", str(registry))
        data = base / "data"
        write_prompts(data)
        qa = write_jsonl(base / "qa.jsonl", qa_rows(16))
        run = train(config(tiny_llama, "causal_lm", "lora", qa, base / "runs" / "chat-lora", "train.max_steps=2",
                           "train.warmup_ratio=0"))
        randomize(run.path, 3)  # answers unlike its base's
        torch.set_flush_denormal(False)  # training turned it on for this thread; the server's threads inherit it
        run_id = db.import_run(run.path)
        with studio(Settings(runs=base / "runs", data_root=data, poll_seconds=0.2)) as url:
            yield {"url": url, "run": run_id, "data": data, "registry": registry}


@pytest.fixture(autouse=True)
def _world_registry(world, monkeypatch):
    monkeypatch.setenv("DELTATUNE_REGISTRY", str(world["registry"]))


def start(page, world, mode: str, out: str, k: str = "2") -> None:
    page.goto(world["url"] + "/feedback")
    page.get_by_label("Prompts file").select_option("prompts.jsonl")
    page.get_by_label("Model that writes the responses").select_option(f"run:{world['run']}")
    page.get_by_label(dict(pick="pick the best", rank="rank all", thumbs="thumbs up")[mode], exact=False).check()
    if mode != "thumbs":
        page.get_by_label("Responses per prompt").fill(k)
    page.get_by_label("Output file").fill(out)
    page.get_by_text("Sampling settings").click()
    page.get_by_label("Most new tokens").fill("16")
    page.get_by_role("button", name="Start labeling").click()


def prompt_shown(page, number: int) -> None:
    page.get_by_role("heading", name=f"Prompt {number} of 4").wait_for(timeout=120_000)


def test_three_preference_pairs_by_click_and_keys_reach_the_reader(world, page):
    page.goto(world["url"] + "/feedback")
    check(page, "feedback-setup")
    start(page, world, "pick", "feedback/pairs.jsonl")
    prompt_shown(page, 1)
    check(page, "feedback-pick")
    first = page.locator(".fb-card .fb-text").all_inner_texts()
    page.get_by_role("button", name="Response 2 is best").click()
    prompt_shown(page, 2)
    second = page.locator(".fb-card .fb-text").all_inner_texts()
    page.keyboard.press("1")
    prompt_shown(page, 3)
    page.keyboard.press("t")  # a tie: skipped, no pair
    prompt_shown(page, 4)
    fourth = page.locator(".fb-card .fb-text").all_inner_texts()
    page.keyboard.press("2")
    page.get_by_text("All 4 prompts are done").wait_for()
    assert "3 answered · 1 skipped" in page.locator(".fb-progress").inner_text()
    check(page, "feedback-done")
    prefs = load_preferences(world["data"] / "feedback" / "pairs.jsonl")
    assert [(p.prompt, p.responses) for p in prefs] == [
        (PROMPTS[0], [first[1], first[0]]), (PROMPTS[1], second), (PROMPTS[3], [fourth[1], fourth[0]])]


def test_three_responses_are_ranked_by_dragging_and_keys(world, page):
    start(page, world, "rank", "feedback/ranked.jsonl", k="3")
    prompt_shown(page, 1)
    cards = page.locator("ol.fb-ranking > li")
    texts = {n: page.locator(f"li[data-n='{n}'] .fb-text").inner_text() for n in "123"}
    cards.nth(2).drag_to(cards.nth(0), target_position={"x": 20, "y": 5})
    assert page.locator("input.fb-order").input_value() == "3 1 2"
    page.locator("li[data-n='1']").focus()
    page.keyboard.press("ArrowDown")
    assert page.locator("input.fb-order").input_value() == "3 2 1"
    check(page, "feedback-rank")
    page.get_by_role("button", name="Save this ranking").click()
    prompt_shown(page, 2)
    page.keyboard.press("2")
    page.keyboard.press("3")
    assert page.locator("input.fb-order").input_value().startswith("2 3")
    page.keyboard.press("Enter")
    prompt_shown(page, 3)
    rows = [json.loads(line) for line in (world["data"] / "feedback" / "ranked.jsonl").read_text().splitlines()]
    assert rows[0]["ranking"] == [2, 1, 0] and rows[1]["ranking"] == [1, 2, 0]
    best_first = load_preferences(world["data"] / "feedback" / "ranked.jsonl")[0].responses
    assert best_first == [texts["3"], texts["2"], texts["1"]]


def test_thumbs_write_the_rows_kto_reads(world, page):
    start(page, world, "thumbs", "feedback/thumbs.jsonl")
    prompt_shown(page, 1)
    check(page, "feedback-thumbs")
    page.keyboard.press("u")
    prompt_shown(page, 2)
    page.get_by_role("button", name="Thumbs down").click()
    prompt_shown(page, 3)
    thumbs = load_thumbs(world["data"] / "feedback" / "thumbs.jsonl")
    assert [(t.prompt, t.desirable) for t in thumbs] == [(PROMPTS[0], True), (PROMPTS[1], False)]


def test_the_playground_streams_the_base_and_the_run_side_by_side(world, page):
    page.goto(f"{world['url']}/playground?run={world['run']}")
    check(page, "playground-start")
    box = page.get_by_label("Your message")
    box.fill("what is 1 and 2")
    box.press("Enter")
    answers = page.locator(".pg-msg.assistant")
    answers.nth(1).wait_for()
    page.wait_for_function("() => document.querySelectorAll('.pg-msg.assistant[data-pieces]').length === 2",
                           timeout=120_000)
    assert [int(a.get_attribute("data-pieces")) for a in answers.all()] >= [2, 2]
    base, run = answers.all_inner_texts()
    assert base.strip() and run.strip() and base != run
    box.fill("hello")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.querySelectorAll('.pg-msg.assistant[data-pieces]').length === 4",
                           timeout=120_000)
    assert page.locator(".pg-msg.user").count() == 4 and page.locator(".pg-msg.error").count() == 0
    check(page, "playground")
