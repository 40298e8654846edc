"""The studio's pages and guards through the ASGI app (no browser): what each page shows, filters and
sorting, 404s, plain error pages without traces, the token, the Host check, CSRF, paths confined to the data
root, upload limits. tests/unit/test_studio_browser.py drives the same app in a real browser."""

from __future__ import annotations

import json

import re

import pytest
from fastapi.testclient import TestClient

from deltatune import registry_db as db
from deltatune.errors import ArgumentError
from deltatune.studio.app import create_app
from deltatune.studio.security import check_bind
from deltatune.studio.settings import Settings
from tests.studio_runs import write_run


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs"
    ids = {"lora": write_run(folder / "lora", "lora", accuracy=0.81),
           "bitfit": write_run(folder / "bitfit", "bitfit", accuracy=0.74, trainable=102_914),
           "failed": write_run(folder / "failed", "ia3", status="failed",
                               error="NonFiniteError: train: the loss is nan at step 7; start a new run with a lower "
                                     "train.lr")}
    return ids


def client(tmp_path, **settings) -> TestClient:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    rows = [f"film {i} was {'fine' if i % 2 else 'dull'},{'positive' if i % 2 else 'negative'}" for i in range(40)]
    (data / "reviews.csv").write_text("text,label\n" + "\n".join(rows + rows[:3]) + "\n", encoding="utf-8")
    app = create_app(Settings(runs=tmp_path / "runs", data_root=data, allowed_hosts=("testserver",), **settings))
    return TestClient(app, raise_server_exceptions=False)


def csrf(page: str) -> str:
    return re.search(r"name='csrf-token' content='([0-9a-f]+)'", page).group(1)


def test_the_runs_page_lists_filters_searches_and_sorts_the_registry(runs, tmp_path):
    c = client(tmp_path)
    page = c.get("/").text
    assert all(run_id in page for run_id in runs.values())
    assert "<title>Runs · deltatune studio</title>" in page and 'aria-current=page>Runs' in page
    only_failed = c.get("/", params={"status": "failed"}).text
    assert runs["failed"] in only_failed and runs["lora"] not in only_failed
    searched = c.get("/", params={"q": "bitfit"}).text
    assert runs["bitfit"] in searched and runs["lora"] not in searched
    best_first = c.get("/", params={"sort": "metric"}).text
    assert best_first.index(runs["lora"]) < best_first.index(runs["bitfit"])


def test_an_empty_registry_says_how_to_record_a_run(tmp_path):
    assert "No runs recorded yet" in client(tmp_path).get("/").text


def test_the_run_page_shows_metrics_cost_curves_per_class_confusion_data_and_config(runs, tmp_path):
    page = client(tmp_path).get(f"/runs/{runs['lora']}").text
    for shown in ("Before and after training", "0.8100", "+0.3100", "338,690", "1.49 %", "Learning curves",
                  "<polyline", "optimizer step", "Per class", "Confusion matrix", "Rows read", "config.yaml",
                  "Export", "nothing to resume: the run completed"):
        assert shown in page, shown


def test_the_run_page_says_where_its_trackers_wrote_and_how_to_open_them(runs, tmp_path):
    c = client(tmp_path)
    assert "Tracking" not in c.get(f"/runs/{runs['lora']}").text  # a run without train.report_to
    folder = tmp_path / "runs" / "lora"
    (folder / "tracking.json").write_text(json.dumps({
        "tensorboard": {"path": "tensorboard"},
        "mlflow": {"path": "mlflow/mlflow.db", "artifacts": "mlflow/artifacts", "experiment_id": "1", "run_id": "ab"}}))
    page = c.get(f"/runs/{runs['lora']}").text
    assert "<h2>Tracking</h2>" in page
    assert f"tensorboard --logdir {folder.resolve() / 'tensorboard'}" in page
    assert f"mlflow ui --backend-store-uri sqlite:///{folder.resolve() / 'mlflow' / 'mlflow.db'}" in page


def test_a_failed_run_shows_its_error_and_what_to_do(runs, tmp_path):
    page = client(tmp_path).get(f"/runs/{runs['failed']}").text
    assert "the loss is nan at step 7" in page and "What to do:" in page and "Resume this run" in page
    assert "a run can be exported once it has completed" in page


def test_unknown_runs_are_404_pages_and_errors_never_show_a_trace(runs, tmp_path, monkeypatch):
    c = client(tmp_path)
    for url in ("/runs/0123abcd", "/runs/..%2F..%2Fetc", "/runs/not-an-id/part/curves", "/nowhere"):
        response = c.get(url)
        assert response.status_code == 404 and "What to do:" in response.text, url
    monkeypatch.setattr(db, "list_runs", lambda *a, **k: 1 / 0)
    broken = c.get("/")
    assert broken.status_code == 500 and "could not show this page" in broken.text
    assert "Traceback" not in broken.text and "ZeroDivisionError" not in broken.text


def test_compare_marks_the_best_and_draws_the_pareto_front_and_curves(runs, tmp_path):
    page = client(tmp_path).get("/compare", params={"id": [runs["lora"], runs["bitfit"]]}).text
    assert "Side by side" in page and '<span class="tag">best</span>' in page
    best_cell = re.search(r'<span class="best">([^<]+)', page).group(1)
    assert best_cell.startswith("0.8100")
    assert "Metric against trainable parameters" in page and "Pareto front" in page
    assert "Learning curves (training loss)" in page
    picker = client(tmp_path).get("/compare").text
    assert "Pick two or more runs" in picker and runs["bitfit"] in picker


def test_the_data_page_inspects_a_file_and_makes_its_data_report(tmp_path):
    c = client(tmp_path)
    assert "reviews.csv" in c.get("/data").text
    page = c.get("/data", params={"file": "reviews.csv"}).text
    assert "Exact duplicate rows" in page and "most common values" in page and "positive" in page
    report = c.get("/data", params={"file": "reviews.csv", "report": "1", "model": "", "task": "classification"}).text
    assert "Duplicates and leakage" in report and "Labels" in report


@pytest.mark.parametrize("file,status", [("../outside.csv", 400), ("/etc/passwd", 400), ("a/../../x.csv", 400),
                                         ("link/secret.csv", 403), ("missing.csv", 404)])
def test_file_choices_stay_under_the_data_root(tmp_path, file, status):
    c = client(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.csv").write_text("text,label\nx,y\n")
    (tmp_path / "data" / "link").symlink_to(outside)
    response = c.get("/data", params={"file": file})
    assert response.status_code == status and "secret" not in response.text.replace(file, "")


def test_a_post_without_its_csrf_token_is_refused(runs, tmp_path):
    c = client(tmp_path)
    started = []
    c.app.state.jobs.start = lambda kind, argv, run_id=None: started.append((kind, argv))
    assert c.post(f"/runs/{runs['failed']}/resume").status_code == 403
    assert c.post(f"/runs/{runs['failed']}/resume", data={"csrf_token": "0" * 40}).status_code == 403
    token = csrf(c.get(f"/runs/{runs['failed']}").text)
    done = c.post(f"/runs/{runs['failed']}/resume", data={"csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303 and started == [("resume", ["train", "--resume", str(tmp_path / "runs" / "failed")])]
    refused = c.post(f"/runs/{runs['lora']}/resume", data={"csrf_token": token})
    assert refused.status_code == 400 and len(started) == 1


def test_uploads_are_size_limited_named_safely_and_never_overwrite(tmp_path):
    c = client(tmp_path, max_upload_bytes=100)
    token = csrf(c.get("/data").text)
    headers = {"X-CSRF-Token": token, "X-Filename": "../../evil name.csv"}
    first = c.post("/data/upload", content=b"text,label\na,b\n", headers=headers)
    assert first.status_code == 200 and first.json()["file"] == "uploads/evil_name.csv"
    again = c.post("/data/upload", content=b"text,label\nc,d\n", headers=headers)
    assert again.json()["file"] == "uploads/evil_name-2.csv"
    assert c.post("/data/upload", content=b"x" * 101, headers=headers).status_code == 413
    assert c.post("/data/upload", content=b"x", headers={**headers, "X-Filename": "a.exe"}).status_code == 400
    assert c.post("/data/upload", content=b"x", headers={"X-Filename": "a.csv"}).status_code == 403
    assert sorted(p.name for p in (tmp_path / "data" / "uploads").iterdir()) == ["evil_name-2.csv", "evil_name.csv"]


def test_another_host_needs_a_token_and_every_request_then_carries_it(runs, tmp_path):
    with pytest.raises(ArgumentError, match="--token"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    c = client(tmp_path, host="0.0.0.0", token="s3cret-token")
    assert c.get("/").status_code == 401
    assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200
    entered = c.get("/?token=s3cret-token&q=lora", follow_redirects=False)
    assert entered.status_code == 303 and entered.headers["location"] == "/?q=lora"
    assert c.get("/").status_code == 200  # the cookie set by the link


def test_a_loopback_studio_answers_only_to_loopback_names(tmp_path):
    c = client(tmp_path)
    assert c.get("/", headers={"Host": "evil.example:7860"}).status_code == 400
    assert c.get("/", headers={"Host": "127.0.0.1:7860"}).status_code == 200
    assert c.get("/", headers={"Host": "localhost"}).status_code == 200


def test_pages_forbid_scripts_from_elsewhere(tmp_path):
    response = client(tmp_path).get("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert "http" not in re.sub(r'href="/[^"]*"', "", response.text).replace("http-equiv", "")


def test_the_serve_api_mounts_under_api_with_its_own_guard(tmp_path):
    from fastapi import FastAPI

    api = FastAPI()
    api.post("/v1/echo")(lambda: {"ok": True})
    app = create_app(Settings(runs=tmp_path, data_root=tmp_path, allowed_hosts=("testserver",)), api=api)
    c = TestClient(app)
    assert c.post("/api/v1/echo").json() == {"ok": True}  # no studio cookie or CSRF: the API checks its keys
    assert c.post("/runs/0123abcd/resume").status_code == 403


def test_the_command_refuses_another_host_without_a_token_and_records_run_folders(tmp_path, capsys, monkeypatch):
    from deltatune.cli import main
    from deltatune.studio.server import import_runs

    assert main(["studio", "--host", "0.0.0.0", "--data-root", str(tmp_path)]) == 2
    assert "--token" in capsys.readouterr().err
    folder = tmp_path / "runs" / "compare-x" / "lora" / "seed-1"  # three levels down, as compare keeps them
    write_run(folder, "lora")
    monkeypatch.setenv("DELTATUNE_REGISTRY", str(tmp_path / "other.sqlite"))  # a registry without the run
    assert import_runs(tmp_path / "runs") == 1 and import_runs(tmp_path / "runs") == 0
    [run] = db.list_runs()
    assert run["path"] == str(folder.resolve()) and run["status"] == "completed"


def test_the_token_can_come_from_the_environment_instead_of_the_command_line(tmp_path, monkeypatch, capsys):
    """A token on the command line is visible to every user in `ps`; DELTATUNE_STUDIO_TOKEN is not."""
    from deltatune.cli import main
    from deltatune.studio import server

    served = []

    class Server:  # uvicorn's, without listening: records what it would serve
        def __init__(self, config):
            served.append(config.app.state.settings)

        def run(self):
            pass

    monkeypatch.setattr(server.uvicorn, "Server", Server)
    monkeypatch.setenv("DELTATUNE_STUDIO_TOKEN", "s3cret-from-env")
    assert main(["studio", "--host", "0.0.0.0", "--data-root", str(tmp_path), "--runs", str(tmp_path)]) == 0
    assert served[0].token == "s3cret-from-env" and "?token=s3cret-from-env" in capsys.readouterr().out


def test_a_command_cancelled_with_ctrl_c_reads_cancelled_not_failed(tmp_path):
    from deltatune.studio.jobs import Job

    class Ended:  # a finished process: only its exit code matters
        def __init__(self, code):
            self.code = code

        def poll(self):
            return self.code

    states = [Job("j", "train", [], None, tmp_path / "log", Ended(code)).state for code in (None, 0, 130, -2, 1)]
    assert states == ["running", "finished", "cancelled", "cancelled", "failed (exit code 1)"]


def test_a_completed_run_without_samples_offers_held_out_answers_as_a_job(runs, tmp_path):
    c = client(tmp_path)
    started = []
    c.app.state.jobs.start = lambda kind, argv, run_id=None: started.append((kind, argv, run_id))
    page = c.get(f"/runs/{runs['lora']}").text
    assert "Show answers on 5 held-out examples" in page and f'action="/runs/{runs["lora"]}/samples"' in page
    assert "Show answers on" not in c.get(f"/runs/{runs['failed']}").text  # not completed: nothing to answer with
    assert c.post(f"/runs/{runs['lora']}/samples").status_code == 403  # no CSRF token
    assert c.post(f"/runs/{runs['lora']}/samples", data={"csrf_token": "0" * 40}).status_code == 403
    assert started == []
    token = csrf(page)
    done = c.post(f"/runs/{runs['lora']}/samples", data={"csrf_token": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"].endswith("#samples")
    folder = str(tmp_path / "runs" / "lora")
    assert started == [("samples", ["eval", folder, "--samples", "5"], runs["lora"])]
    refused = c.post(f"/runs/{runs['failed']}/samples", data={"csrf_token": token})
    assert refused.status_code == 400 and len(started) == 1


def test_a_run_with_samples_shows_them_with_the_reference_and_offers_no_button(runs, tmp_path):
    c = client(tmp_path)
    rows = [{"prompt": "a <b>fine</b> film", "reference": "positive", "before": "negative (0.52)",
             "after": "positive (0.91)"}]
    (tmp_path / "runs" / "lora" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for url in (f"/runs/{runs['lora']}", f"/runs/{runs['lora']}/part/samples"):
        shown = c.get(url).text
        assert "Show answers on" not in shown, url
        assert ">reference</th>" in shown and "positive (0.91)" in shown and "negative (0.52)" in shown, url
        assert "a &lt;b&gt;fine&lt;/b&gt; film" in shown, url
    token = csrf(c.get(f"/runs/{runs['lora']}").text)
    assert c.post(f"/runs/{runs['lora']}/samples", data={"csrf_token": token}).status_code == 400
    # PPO-style rows (no reference): no reference column.
    (tmp_path / "runs" / "lora" / "samples.jsonl").write_text(json.dumps({"prompt": "p", "before": "x", "after": "y"}))
    assert ">reference</th>" not in c.get(f"/runs/{runs['lora']}/part/samples").text
