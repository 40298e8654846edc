"""The run registry: real runs recorded field by field, failures, filters, the CLI, concurrent writers."""

import json
import multiprocessing
import os
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from deltatune import registry_db as db
from deltatune.cli import main
from deltatune.errors import RunError, Stopped
from tests.helpers import config

RESUMABLE = ["train.epochs=2", "train.save_every=2", "train.lr=2e-3"]


def _cfg(model: str = "minilm", method: str = "lora", task: str = "classification") -> dict:
    return {"model": model, "task": task, "method": {"name": method, "r": 8}}


def _record(path, status="completed", accuracy=0.5, fingerprint="ab" * 32, **cfg) -> str:
    run_id = db.record_start(path, _cfg(**cfg))
    metrics = {"eval": {"accuracy": accuracy, "macro_f1": accuracy - 0.1, "loss": 0.7},
               "baseline": {"accuracy": 0.5, "macro_f1": 0.4, "loss": 0.69}, "trainable_params": 1000,
               "total_params": 50000, "train_seconds": 1.5, "peak_rss_mb": 321.0, "data_fingerprint": fingerprint}
    db.record_end(run_id, status, metrics if status == "completed" else None)
    return run_id


def _json_out(capsys, *argv):
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_a_training_run_and_its_evaluation_are_recorded_in_full(tiny_bert, cls_csv, tmp_path, capsys):
    from deltatune.train.run import train

    run = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run", "train.lr=5e-3")).path
    metrics = json.loads((run / "metrics.json").read_text())
    rec = db.get(str(run))
    assert len(rec["id"]) == 8 and int(rec["id"], 16) >= 0
    assert (rec["path"], rec["kind"], rec["parent"], rec["status"], rec["error"]) == (
        str(run.resolve()), "train", None, "completed", None)
    assert (rec["model"], rec["method"], rec["task"]) == (str(Path(tiny_bert).resolve()), "lora", "classification")
    assert rec["config"] == yaml.safe_load((run / "config.yaml").read_text())
    assert rec["metrics"] == metrics
    assert rec["versions"] == json.loads((run / "env.json").read_text()) and "torch" in rec["versions"]
    fingerprint = json.loads((run / "data.json").read_text())["fingerprint"]
    assert rec["data_fingerprint"] == metrics["data_fingerprint"] == fingerprint
    assert rec["main_metric"] == "accuracy"
    assert rec["main_value"] == metrics["eval"]["accuracy"] and rec["baseline_value"] == metrics["baseline"]["accuracy"]
    assert rec["eval_loss"] == metrics["eval"]["loss"]
    for key in ("trainable_params", "total_params", "train_seconds", "steps", "tokens_per_s", "peak_rss_mb"):
        assert rec[key] == metrics[key] and rec[key] > 0, key
    assert rec["delta_bytes"] == sum(f.stat().st_size for f in (run / "delta").rglob("*") if f.is_file()) > 0
    assert datetime.fromisoformat(rec["started"]) <= datetime.fromisoformat(rec["ended"])
    assert db.get(rec["id"][:6]) == rec == db.get(rec["id"])

    # `deltatune eval RUN --data FILE` is a run of its own: kind eval, parent the training run.
    evaluated = _json_out(capsys, "eval", str(run), "--data", str(cls_csv))
    (ev,) = db.list_runs(kind="eval")
    assert (ev["parent"], ev["path"], ev["status"], ev["task"], ev["method"]) == (
        rec["id"], rec["path"], "completed", "classification", "lora")
    assert ev["metrics"] == {**evaluated, "data": str(cls_csv.resolve())}
    assert ev["main_value"] == evaluated["eval"]["accuracy"] and ev["peak_rss_mb"] > 0
    assert ev["versions"]["torch"] and ev["ended"]
    assert db.get(str(run))["id"] == rec["id"]  # a path names the training run, not its evaluations

    # The CLI shows the same records; --json is the registry's own data.
    assert _json_out(capsys, "runs", "show", rec["id"], "--json") == rec
    assert [r["id"] for r in _json_out(capsys, "runs", "list", "--json")] == [ev["id"], rec["id"]]
    assert [r["id"] for r in _json_out(capsys, "runs", "compare", rec["id"], ev["id"][:5], "--json")] == [
        rec["id"], ev["id"]]
    assert main(["runs", "show", str(run)]) == 0
    out = capsys.readouterr().out
    assert rec["id"] in out and rec["data_fingerprint"][:12] in out and "accuracy" in out
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert rec["id"] in out and ev["id"] in out


def test_failed_and_interrupted_runs_and_resume(tiny_bert, cls_csv, tmp_path):
    from deltatune.train.run import resume, train

    def boom(state):
        raise RuntimeError("boom")

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(RuntimeError, match="boom"):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "failed", *RESUMABLE), callbacks=(boom,),
              kind="trial", parent="5dd1e5")
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "stopped", *RESUMABLE),
              callbacks=(interrupt,))
    (failed,) = db.list_runs(status="failed")
    (stopped,) = db.list_runs(status="interrupted")
    assert failed["path"] == str(tmp_path / "failed") and failed["error"] == "RuntimeError: boom"
    assert (failed["kind"], failed["parent"], stopped["kind"], stopped["parent"]) == ("trial", "5dd1e5", "train", None)
    assert stopped["path"] == str(tmp_path / "stopped") and stopped["error"] is None
    for rec in (failed, stopped):
        assert rec["ended"] and rec["metrics"] == {} and rec["main_value"] is None and rec["delta_bytes"] is None
        assert rec["data_fingerprint"] == json.loads((Path(rec["path"]) / "data.json").read_text())["fingerprint"]
        assert rec["versions"]["torch"]
    assert db.list_runs(status="completed") == []

    resume(tmp_path / "stopped")  # the same run directory: the same record, now completed
    (done,) = db.list_runs(status="completed")
    assert done["id"] == stopped["id"] and done["started"] == stopped["started"]
    assert done["metrics"] == json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    assert done["error"] is None and done["delta_bytes"] > 0 and len(db.list_runs()) == 2


def test_a_broken_registry_only_warns(tiny_bert, cls_csv, tmp_path, monkeypatch, capsys):
    from deltatune.train.run import train

    monkeypatch.setenv("DELTATUNE_REGISTRY", str(tmp_path))  # a directory: SQLite cannot open it
    run = train(config(tiny_bert, "classification", "bitfit", cls_csv, tmp_path / "run"))
    assert json.loads((run.path / "status.json").read_text())["status"] == "completed"
    assert "warning: run registry" in capsys.readouterr().err


def test_list_filters_order_and_limit(tmp_path, capsys):
    a = _record(tmp_path / "a", model="minilm", method="lora")
    b = _record(tmp_path / "b", status="failed", model="/models/tiny-bert", method="bitfit")
    c = _record(tmp_path / "c", model="/models/tiny-bert", method="lora", task="causal_lm")
    d = db.record_start(tmp_path / "a", _cfg(), kind="eval", parent=a)
    ids = lambda runs: [r["id"] for r in runs]  # noqa: E731
    assert ids(db.list_runs()) == [d, c, b, a]  # newest first
    assert ids(db.list_runs(limit=2)) == [d, c]
    assert ids(db.list_runs(status="failed")) == [b] and ids(db.list_runs(status="running")) == [d]
    assert ids(db.list_runs(model="tiny-bert")) == [c, b] == ids(db.list_runs(model="/models/tiny-bert"))
    assert ids(db.list_runs(model="bert")) == []  # a folder name matches whole, not in part
    assert ids(db.list_runs(method="lora", kind="train")) == [c, a]
    assert ids(db.list_runs(task="causal_lm")) == [c] and ids(db.list_runs(parent=a)) == [d]
    assert ids(_json_out(capsys, "runs", "list", "--model", "tiny-bert", "--method", "lora", "--json")) == [c]
    assert ids(_json_out(capsys, "runs", "list", "--status", "failed", "--limit", "5", "--json")) == [b]
    assert _json_out(capsys, "runs", "list", "--status", "interrupted", "--json") == []


def test_compare_side_by_side(tmp_path, capsys):
    a = _record(tmp_path / "a", accuracy=0.9, method="lora")
    b = _record(tmp_path / "b", accuracy=0.7, method="bitfit")
    c = _record(tmp_path / "c", accuracy=0.8, method="full", fingerprint="cd" * 32)
    runs = db.compare([b, a[:5]])
    assert [r["id"] for r in runs] == [b, a] and db.best_index(runs) == 1
    assert db.summary(runs[1])["accuracy"] == "0.9000 (base 0.5000)"
    assert db.summary(runs[1])["trainable"] == "1,000 (2.00%)"

    assert main(["runs", "compare", a, b]) == 0
    out = capsys.readouterr().out
    for text in (a, b, "lora", "bitfit", "accuracy", "0.9000", "0.7000", "macro_f1", "1,000 (2.00%)", "abababababab"):
        assert text in out, text
    assert "fingerprints differ" not in out
    assert main(["runs", "compare", a, c]) == 0
    assert "fingerprints differ" in capsys.readouterr().out

    lm = db.record_start(tmp_path / "lm", _cfg(task="causal_lm"))
    db.record_end(lm, "completed", {"eval": {"loss": 1.0, "perplexity": 2.7}, "baseline": {"perplexity": 9.0}})
    lm2 = db.record_start(tmp_path / "lm2", _cfg(task="causal_lm"))
    db.record_end(lm2, "completed", {"eval": {"loss": 0.5, "perplexity": 1.6}, "baseline": {"perplexity": 9.0}})
    runs = db.compare([lm, lm2])
    assert runs[0]["main_metric"] == "perplexity" and db.best_index(runs) == 1  # lower perplexity wins
    assert db.best_index(db.compare([a, lm])) is None  # no shared metric: no winner
    assert main(["runs", "compare", a, lm]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "accuracy" in out


def test_unknown_and_ambiguous_ids(tmp_path, capsys):
    ids = [_record(tmp_path / f"r{i}") for i in range(17)]  # 17 ids, 16 first digits: two must share one
    first = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    with pytest.raises(RunError, match="ambiguous") as err:
        db.get(first)
    assert all(i in str(err.value) for i in ids if i[0] == first)
    assert main(["runs", "show", first]) == 2
    assert "ambiguous" in capsys.readouterr().err
    with pytest.raises(RunError, match="no run 'nothere'"):
        db.get("nothere")
    assert main(["runs", "show", "0123456789"]) == 2
    assert "no run '0123456789'" in capsys.readouterr().err
    assert main(["runs", "compare", ids[0], "feedfacecafe"]) == 2
    assert "feedfacecafe" in capsys.readouterr().err
    assert main(["runs", "compare", ids[0]]) == 2
    assert "two or more" in capsys.readouterr().err


def test_schema_version_and_migration_hook(tmp_path, monkeypatch):
    run_id = _record(tmp_path / "a")
    path = db.registry_path()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    monkeypatch.setattr(db, "SCHEMA_VERSION", db.SCHEMA_VERSION + 1)
    monkeypatch.setitem(db.MIGRATIONS, db.SCHEMA_VERSION, ("ALTER TABLE runs ADD COLUMN seed INTEGER",))
    assert db.get(run_id)["seed"] is None and db.get(run_id)["status"] == "completed"  # migrated, rows kept
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION

    monkeypatch.setattr(db, "SCHEMA_VERSION", 1)
    with pytest.raises(RunError, match="newer than this deltatune"):
        db.list_runs()


def _writer(registry: str, worker: int, runs: int) -> None:
    os.environ["DELTATUNE_REGISTRY"] = registry
    for n in range(runs):
        run_id = db.record_start(f"/nowhere/w{worker}-{n}", _cfg())
        db.record_end(run_id, "completed", {"eval": {"accuracy": n / runs}, "steps": n})


def test_concurrent_writers_lose_nothing(tmp_path, monkeypatch):
    registry = str(tmp_path / "shared.sqlite")  # created by the workers themselves, at the same time
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_writer, args=(registry, w, 20)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert [p.exitcode for p in workers] == [0, 0]
    monkeypatch.setenv("DELTATUNE_REGISTRY", registry)
    runs = db.list_runs()
    assert len(runs) == 40 and len({r["id"] for r in runs}) == 40
    assert {r["path"] for r in runs} == {f"/nowhere/w{w}-{n}" for w in range(2) for n in range(20)}
    assert all(r["status"] == "completed" and r["steps"] == int(r["path"].rsplit("-", 1)[1]) for r in runs)


def _pruned_trial(tmp_path) -> None:  # version 2: a tuning trial the pruner stopped
    trial = db.record_start(str(tmp_path / "trial"), _cfg(), kind="trial")
    db.record_end(trial, "pruned", error="pruned at step 2")
    assert db.get(trial)["status"] == "pruned"
    assert [r["id"] for r in db.list_runs(status="pruned")] == [trial]


def _merge_run(tmp_path) -> None:  # version 3: the runs merge-deltas writes
    merged = db.record_start(str(tmp_path / "merged"), _cfg(), kind="merge")
    assert db.get(merged)["kind"] == "merge"
    assert db.record_start(str(tmp_path / "merged"), _cfg(), kind="merge") == merged  # its directory is its own


@pytest.mark.parametrize("old, refused, new_row", [(1, "UPDATE runs SET status = 'pruned'", _pruned_trial),
                                                   (2, "UPDATE runs SET kind = 'merge'", _merge_run)],
                         ids=["1-pruned", "2-merge"])
def test_an_older_registry_migrates_keeping_its_rows_and_accepts_the_new_values(tmp_path, monkeypatch, old,
                                                                                refused, new_row):
    monkeypatch.setattr(db, "SCHEMA_VERSION", old)  # a registry written by an earlier release
    run_id = _record(tmp_path / "old")
    with sqlite3.connect(db.registry_path()) as conn:
        with pytest.raises(sqlite3.IntegrityError):  # that release's schema refuses the new value
            conn.execute(refused)
    monkeypatch.setattr(db, "SCHEMA_VERSION", old + 1)
    before = db.get(run_id)
    new_row(tmp_path)
    assert db.get(run_id) == before


def test_a_recording_block_ends_as_a_run_does(tmp_path):
    """Recording (as a context manager) and a training run read an ending the same way: stopped on
    purpose is that status with its reason, not 'failed'."""
    with pytest.raises(Stopped):
        with db.Recording(tmp_path, {"task": "classification", "method": {"name": "lora"}}, "eval") as record:
            raise Stopped("pruned at step 2", status="pruned")
    row = db.get(record.id)
    assert row["status"] == "pruned" and row["error"] == "pruned at step 2"
    assert db.ending(None) == ("completed", None) and db.ending(KeyboardInterrupt()) == ("interrupted", None)
    assert db.ending(ValueError("bad")) == ("failed", "ValueError: bad")
