"""The studio in a real browser (Playwright driving Debian's headless chromium), used as a person would:
look through the runs, open one trained here on a tiny model, watch a run's curve and status update live,
compare two runs, inspect a data file and make its data report, export a run. Every page is screenshotted at
1280x800 and 390x844 into build/screenshots/ and checked by axe-core (no critical violations)."""

from __future__ import annotations


import pytest

from deltatune import registry_db as db
from deltatune.rundir import RunDir
from deltatune.studio.settings import Settings
from tests.conftest import sentiment_rows, write_csv
from tests.helpers import config
from tests.studio_runs import log_records, studio, write_run

from tests.studio_browser import CHROMIUM
from tests.studio_browser import screenshots_and_axe as check

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (make install installs it)")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert):
    """A registry with two runs trained here on the tiny BERT (lora, bitfit), a failed run and a running one
    (written by the library's writers), a data folder, and the studio serving them."""
    from deltatune.train.run import train

    base = tmp_path_factory.mktemp("studio")
    registry = base / "registry.sqlite"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_REGISTRY", str(registry))
        data = base / "data"
        data.mkdir()
        csv = write_csv(data / "sentiment.csv", sentiment_rows(80) + sentiment_rows(6))
        runs = {}
        for method in ("lora", "bitfit"):
            run = train(config(tiny_bert, "classification", method, csv, base / "runs" / method, "train.max_steps=24",
                               "train.eval_every=6", "train.lr=3e-3"))
            runs[method] = db.import_run(run.path)
        runs["failed"] = write_run(base / "runs" / "failed", "ia3", status="failed", model=str(tiny_bert),
                                   error="NonFiniteError: train: the loss is nan at step 7 (epoch 1, learning rate "
                                         "0.05); the run stopped. Start a new run with a lower train.lr")
        runs["running"] = write_run(base / "runs" / "running", "lora", status="running", steps=40)
        settings = Settings(runs=base / "runs", data_root=data, poll_seconds=0.2)
        with studio(settings) as url:
            yield {"url": url, "runs": runs, "base": base, "registry": registry}


@pytest.fixture(autouse=True)
def _world_registry(request, monkeypatch):
    if "world" in request.fixturenames:
        monkeypatch.setenv("DELTATUNE_REGISTRY", str(request.getfixturevalue("world")["registry"]))


def test_the_runs_page_lists_filters_and_searches(world, page):
    page.goto(world["url"] + "/")
    assert page.title() == "Runs · deltatune studio"
    for run_id in world["runs"].values():
        page.get_by_role("link", name=run_id).wait_for()
    check(page, "runs")
    page.get_by_label("Method").select_option("bitfit")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**method=bitfit**")
    assert page.locator("table#runs tbody tr").count() == 1
    page.get_by_label("Search").fill(world["runs"]["failed"])
    page.get_by_label("Method").select_option("")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**q=**")
    assert page.locator("table#runs tbody tr").count() == 1


def test_a_trained_run_shows_its_curves_metrics_and_confusion_matrix(world, page):
    page.goto(f"{world['url']}/runs/{world['runs']['lora']}")
    assert "Completed: accuracy" in page.locator(".done").inner_text()
    curve = page.locator("[data-part=curves] svg polyline").first
    assert len(curve.get_attribute("points").split()) == 24  # one point per logged step
    page.get_by_role("heading", name="Confusion matrix").wait_for()
    page.get_by_role("heading", name="Per class").wait_for()
    check(page, "run")


def test_a_failed_run_says_what_went_wrong_and_what_to_do(world, page):
    page.goto(f"{world['url']}/runs/{world['runs']['failed']}")
    alert = page.get_by_role("alert").first
    assert "the loss is nan at step 7" in alert.inner_text() and "What to do:" in alert.inner_text()
    page.get_by_role("button", name="Resume this run").wait_for()
    check(page, "run-failed")


def test_a_training_run_updates_live(world, page):
    """Lines appended to log.jsonl reach the curve, and the end of the run the status, without a reload."""
    run_id = world["runs"]["running"]
    folder = RunDir(world["base"] / "runs" / "running")
    page.goto(f"{world['url']}/runs/{run_id}")
    curve = page.locator("[data-part=curves] svg polyline").first
    assert len(curve.get_attribute("points").split()) == 20
    check(page, "run-live")
    for record in log_records(30, start=21):
        folder.append_log(record)
    page.wait_for_function("() => document.querySelector('[data-part=curves] svg polyline')"
                           ".getAttribute('points').trim().split(' ').length === 30", timeout=15_000)
    runs_page = page.context.new_page()
    runs_page.goto(world["url"] + "/")
    assert runs_page.locator(f"[data-run='{run_id}'] .badge").inner_text() == "running"
    folder.set_status("failed", error="KeyboardInterrupt")
    db.record_end(run_id, "failed", error="stopped by the test")
    page.locator("[data-part=status] .badge.failed").wait_for(timeout=15_000)
    runs_page.locator(f"[data-run='{run_id}'] .badge.failed").wait_for(timeout=15_000)
    assert "stopped by the test" in page.get_by_role("alert").first.inner_text()


def test_two_runs_are_compared_from_the_runs_page(world, page):
    page.goto(world["url"] + "/")
    for method in ("lora", "bitfit"):
        page.get_by_label(f"compare run {world['runs'][method]}").check()
    page.get_by_role("button", name="Compare selected runs").click()
    page.wait_for_url("**/compare?**")
    page.get_by_role("heading", name="Side by side").wait_for()
    assert page.locator(".best .tag").inner_text() == "best"
    page.get_by_role("heading", name="Metric against trainable parameters").wait_for()
    assert page.locator("svg[aria-label='training loss by step'] polyline").count() == 2
    check(page, "compare")


def test_a_data_file_is_inspected_and_its_data_report_made(world, page):
    page.goto(world["url"] + "/data")
    check(page, "data-choose")
    page.get_by_label("File under").select_option("sentiment.csv")
    page.get_by_role("button", name="Inspect").click()
    page.get_by_role("heading", name="Inspect").wait_for()
    assert "sentiment.csv" in page.locator(".meta").inner_text()
    models = page.get_by_label("Tokenizer").locator("option").all_inner_texts()
    page.get_by_label("Tokenizer").select_option("minilm" if any("minilm" in m for m in models) else "")
    page.get_by_role("button", name="Make the data report").click()
    page.get_by_role("heading", name="Duplicates and leakage").wait_for(timeout=60_000)
    page.get_by_role("heading", name="Labels", exact=True).wait_for()
    page.get_by_role("heading", name="Token lengths", exact=True).wait_for()
    check(page, "data-report")


def test_an_upload_lands_under_the_data_root_and_opens(world, page, tmp_path):
    upload = write_csv(tmp_path / "my reviews.csv", sentiment_rows(30))
    page.goto(world["url"] + "/data")
    page.get_by_label("Upload a file").set_input_files(str(upload))
    page.get_by_role("button", name="Upload", exact=True).click()
    page.wait_for_url("**/data?file=uploads/my_reviews.csv")
    page.get_by_role("heading", name="Inspect").wait_for()


def test_a_completed_run_is_exported_from_its_page(world, page):
    page.goto(f"{world['url']}/runs/{world['runs']['bitfit']}")
    page.get_by_role("button", name="Export").click()
    page.get_by_text("export started").wait_for()
    page.get_by_text("finished", exact=True).wait_for(timeout=180_000)
    assert (world["base"] / "runs" / "bitfit" / "export" / "export.json").is_file()


def test_an_unknown_run_is_a_plain_404_page(world, page):
    response = page.goto(f"{world['url']}/runs/0123abcd")
    assert response.status == 404
    assert "What to do:" in page.get_by_role("alert").inner_text()
    check(page, "not-found")
