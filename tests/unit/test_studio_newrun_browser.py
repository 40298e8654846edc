"""The New run page in a real browser (Playwright driving Debian's headless chromium), used as a person would:
fill the form for the tiny BERT and a small CSV, check it (the plan's memory and time), launch it and watch it
complete with its curve drawn; see the CLI's message at a bad value; cancel a longer run from its page, see it
interrupted, resume it and see it complete. Screenshots at 1280x800 and 390x844 and axe-core on each page."""

from __future__ import annotations

import re
import shutil

import pytest

from deltatune.studio.settings import Settings
from tests.conftest import sentiment_rows, write_csv
from tests.studio_runs import studio

POINTS = "() => (document.querySelector('[data-part=curves] svg polyline')?.getAttribute('points') || '')" \
         ".trim().split(' ').filter(Boolean).length"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert):
    """A data root holding the tiny BERT (models/tiny-bert) and a small CSV, an empty runs folder and
    registry, and the studio serving them (its commands inherit the registry)."""
    base = tmp_path_factory.mktemp("studio-new")
    registry = base / "registry.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_REGISTRY", str(registry))
        mp.setenv("OMP_NUM_THREADS", "1")  # the runs it launches share the machine's cores with the tests
        data = base / "data"
        shutil.copytree(tiny_bert, data / "models" / "tiny-bert")
        write_csv(data / "sentiment.csv", sentiment_rows(80) + sentiment_rows(6))
        settings = Settings(runs=base / "runs", data_root=data, poll_seconds=0.2)
        with studio(settings) as url:
            yield {"url": url, "base": base, "registry": registry}


@pytest.fixture(autouse=True)
def _world_registry(request, monkeypatch):
    if "world" in request.fixturenames:
        monkeypatch.setenv("DELTATUNE_REGISTRY", str(request.getfixturevalue("world")["registry"]))


def label(page, text: str):
    """The visible field whose label starts with ``text`` (other methods' options are on the page, hidden)."""
    return page.get_by_label(re.compile(f"^{re.escape(text)}")).filter(visible=True)


def fill(page, **values: str) -> None:
    """The tiny BERT on sentiment.csv with LoRA, then ``values`` (label text -> value)."""
    label(page, "Base model").select_option("models/tiny-bert")
    label(page, "Training data").select_option("sentiment.csv")
    label(page, "Method").select_option("lora")
    for text, value in values.items():
        label(page, text).fill(value)


def launch(page, check=None) -> str:
    """Launch and wait for the run's page (after the page that waits while the run starts): its id."""
    page.get_by_role("button", name="Launch").click()
    if check:  # the page that waits (it reloads every second: screenshots, no axe)
        page.get_by_role("heading", name="Starting the run").wait_for()
        check(page, "new-run-starting", axe=False)
    page.wait_for_url(re.compile(r"/runs/[0-9a-f]{8}$"), timeout=120_000)
    return page.url.rsplit("/", 1)[1]


def test_a_run_is_made_from_the_form_checked_launched_and_completes(world, page, check):
    page.goto(world["url"] + "/new")
    assert page.title() == "New run · deltatune studio"
    for legend in ("Model and task", "Method", "Data", "Training"):
        page.locator("legend", has_text=legend).first.wait_for()
    assert label(page, "Batch size").input_value() == "16"  # the config's default
    check(page, "new-run")
    fill(page, **{"Max steps": "24", "Evaluate every": "6", "Learning rate": "3e-3", "Batch size": "8"})
    label(page, "Rank r").fill("4")  # the chosen method's options
    page.get_by_role("button", name="Check").click()
    page.get_by_role("heading", name="Checked: ready to launch").wait_for(timeout=120_000)
    prediction = page.locator(".nr-checked").inner_text()
    assert "Peak memory" in prediction and "Time per optimizer step" in prediction and "MB" in prediction
    assert "method.r=4" in prediction and "train.max_steps=24" in prediction
    check(page, "new-run-checked")
    run_id = launch(page, check)
    page.locator("[data-part=status] .badge.completed").wait_for(timeout=180_000)
    page.wait_for_function(f"() => ({POINTS})() === 24", timeout=30_000)  # one point per logged step
    assert "Completed: accuracy" in page.locator(".done").inner_text()
    assert run_id in page.title()
    page.locator("[data-part=actions] details b", has_text="finished").wait_for(timeout=60_000)  # the command too
    check(page, "new-run-completed")


def test_a_bad_value_shows_the_command_lines_message_at_its_field(world, page, check):
    page.goto(world["url"] + "/new")
    fill(page, **{"Batch size": "0", "Learning rate": "fast"})
    page.get_by_role("button", name="Check").click()
    message = "train.batch_size: must be greater than 0, got 0"
    page.get_by_role("alert").filter(has_text=message).wait_for()
    field = label(page, "Batch size")
    assert field.get_attribute("aria-invalid") == "true"
    assert message in page.locator("#f-train-batch-size-error").inner_text()
    assert "train.lr: expected a number, got 'fast'" in page.locator("#f-train-lr-error").inner_text()
    assert field.input_value() == "0"  # what was typed stays
    check(page, "new-run-invalid")


def test_a_run_is_cancelled_from_its_page_and_resumed_to_the_end(world, page, check):
    page.goto(world["url"] + "/new")
    fill(page, **{"Max steps": "500", "Evaluate every": "25", "Batch size": "8"})
    run_id = launch(page)
    cancel = page.get_by_role("button", name="Cancel the run")
    cancel.wait_for(timeout=60_000)
    page.wait_for_function(f"() => ({POINTS})() >= 40", timeout=120_000)  # past its first checkpoint
    cancel.click()
    page.locator("[data-part=status] .badge.interrupted").wait_for(timeout=60_000)
    assert "The run was stopped before the end" in page.get_by_role("alert").first.inner_text()
    assert page.get_by_role("button", name="Cancel the run").count() == 0
    stopped_at = page.evaluate(POINTS)
    assert 40 <= stopped_at < 500
    check(page, "run-interrupted")
    page.get_by_role("button", name="Resume this run").click()
    page.wait_for_url(f"**/runs/{run_id}*")
    page.locator("[data-part=status] .badge.completed").wait_for(timeout=240_000)
    page.wait_for_function(f"() => ({POINTS})() === 500", timeout=30_000)  # every step, once
    assert "Completed: accuracy" in page.locator(".done").inner_text()
