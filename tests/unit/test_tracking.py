"""train.report_to: a run's log, config and final metrics, written with TensorBoard's and MLflow's own writers
inside the run directory, read back with their own readers (EventAccumulator, MlflowClient)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from deltatune import config as config_module
from deltatune.errors import ConfigError
from deltatune.rundir import RunDir
from deltatune.train import tracking
from deltatune.train.run import resume, train
from deltatune.train.tracking import tracking_locations
from tests.helpers import config

BOTH = "train.report_to=[tensorboard,mlflow]"


def log_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """log.jsonl as {scalar: [(step, value), ...]} (nested keys joined by "/", as the trackers name them)."""
    found: dict[str, list] = {}
    for line in map(json.loads, (run / "log.jsonl").read_text().splitlines()):
        for name, value in tracking.scalars(line).items():
            found.setdefault(name, []).append((line["step"], value))
    return found


def tensorboard(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tracking_locations(run)["tensorboard"]["path"], size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    where = tracking_locations(run)["mlflow"]
    client = MlflowClient(tracking_uri=where["tracking_uri"])
    return client, client.get_run(where["run_id"])


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tracking")
    from tests.conftest import sentiment_rows, write_csv

    data = write_csv(folder / "sentiment.csv", sentiment_rows(48))
    return train(config(tiny_bert, "classification", "lora", data, folder / "run", "train.epochs=2",
                        "train.eval_every=3", BOTH)).path


def test_the_run_says_where_its_trackers_wrote(run):
    found = tracking_locations(run)
    assert set(found) == {"tensorboard", "mlflow"}
    assert Path(found["tensorboard"]["path"]) == run.resolve() / "tensorboard"
    assert any(Path(found["tensorboard"]["path"]).glob("events.out.tfevents.*"))
    assert found["tensorboard"]["open"] == f"tensorboard --logdir {run.resolve() / 'tensorboard'}"
    assert Path(found["mlflow"]["path"]) == run.resolve() / "mlflow" / "mlflow.db"
    assert found["mlflow"]["tracking_uri"] == f"sqlite:///{run.resolve() / 'mlflow' / 'mlflow.db'}"
    assert found["mlflow"]["open"] == f"mlflow ui --backend-store-uri {found['mlflow']['tracking_uri']}"
    assert tracking_locations(run.parent) == {}  # not a run with trackers


def test_tensorboard_holds_the_log_the_config_and_the_final_metrics(run):
    events, logged = tensorboard(run), log_scalars(run)
    assert {"loss", "lr", "tokens", "eval/accuracy"} <= set(logged)
    for name, points in logged.items():
        read = [(e.step, e.value) for e in events.Scalars(name)]
        assert [step for step, _ in read] == [step for step, _ in points], name
        assert [value for _, value in read] == pytest.approx([value for _, value in points], rel=1e-6), name
    metrics = json.loads((run / "metrics.json").read_text())
    final = events.Scalars("final/eval/accuracy")
    assert [(e.step, e.value) for e in final] == [(metrics["steps"], pytest.approx(metrics["eval"]["accuracy"]))]
    assert events.Scalars("final/trainable_params")[0].value == metrics["trainable_params"]
    config_text = events.Tensors("config.yaml/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(config_text.replace("\n    ", "\n").strip()) == yaml.safe_load((run / "config.yaml").read_text())
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hparams.session_start_info.hparams["method.name"].string_value == "lora"
    assert hparams.session_start_info.hparams["train.epochs"].number_value == 2


def test_mlflow_holds_the_log_the_config_and_the_final_metrics(run):
    client, recorded = mlflow_run(run)
    assert recorded.info.status == "FINISHED"
    for name, points in log_scalars(run).items():
        history = [(m.step, m.value) for m in client.get_metric_history(recorded.info.run_id, name)]
        assert sorted(history) == points, name  # the same numbers at the same steps, none twice
    metrics = json.loads((run / "metrics.json").read_text())
    assert recorded.data.metrics["final/eval/accuracy"] == metrics["eval"]["accuracy"]
    assert recorded.data.metrics["final/baseline/accuracy"] == metrics["baseline"]["accuracy"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded.data.params["train.lr"] == str(saved["train"]["lr"])
    assert recorded.data.params["method.name"] == "lora"
    assert recorded.data.params["train.report_to"] == '["tensorboard", "mlflow"]'
    assert {a.path for a in client.list_artifacts(recorded.info.run_id)} == {"config.yaml", "metrics.json"}
    artifacts = Path(tracking_locations(run)["mlflow"]["artifacts"])
    assert artifacts.is_relative_to(run.resolve())  # nothing is written outside the run directory


def test_mlflow_sends_nothing_away(run):
    from mlflow.environment_variables import MLFLOW_DISABLE_TELEMETRY

    assert MLFLOW_DISABLE_TELEMETRY.get()  # switched off by the tracker, before mlflow is imported


def test_a_resumed_run_rewrites_its_trackers_from_its_log(tiny_bert, cls_csv, tmp_path):
    settings = ["train.epochs=2", "train.save_every=2", "train.eval_every=4", BOTH]

    def interrupt(state):
        if state.step == 3:  # its checkpoint is at step 2: step 3 is logged, then done again
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run", *settings), callbacks=(interrupt,))
    assert mlflow_run(tmp_path / "run")[1].info.status == "KILLED"
    resume(tmp_path / "run")
    logged = log_scalars(tmp_path / "run")
    assert [step for step, _ in logged["loss"]] == list(range(1, len(logged["loss"]) + 1))
    events = tensorboard(tmp_path / "run")
    assert [e.step for e in events.Scalars("loss")] == [step for step, _ in logged["loss"]]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([value for _, value in logged["loss"]], rel=1e-6)
    client, recorded = mlflow_run(tmp_path / "run")
    assert recorded.info.status == "FINISHED"
    assert [r.info.run_id for r in client.search_runs([recorded.info.experiment_id])] == [recorded.info.run_id]
    assert sorted((m.step, m.value) for m in client.get_metric_history(recorded.info.run_id, "loss")) == logged["loss"]


def test_report_to_names_known_trackers(tiny_bert, cls_csv):
    with pytest.raises(ConfigError) as exc:
        config(tiny_bert, "classification", "lora", cls_csv, None, "train.report_to=[wandb,tensorboard]")
    assert "train.report_to: unknown tracker 'wandb'; known: tensorboard, mlflow" in str(exc.value)
    with pytest.raises(ConfigError, match="train.report_to: mlflow is named twice"):
        config(tiny_bert, "classification", "lora", cls_csv, None, "train.report_to=[mlflow,mlflow]")
    assert config(tiny_bert, "classification", "lora", cls_csv).train.report_to == []


def test_a_tracker_without_its_library_says_what_to_install(tiny_bert, cls_csv, monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find(name, *a))
    with pytest.raises(ConfigError) as exc:
        config(tiny_bert, "classification", "lora", cls_csv, None, BOTH)
    assert "train.report_to: mlflow needs the mlflow library, which is not installed: " \
           "pip install 'mlflow-skinny==3.17.2'" in str(exc.value)
    assert "tensorboard" not in str(exc.value)


def test_every_tracker_the_config_knows_has_a_writer_and_the_pinned_library():
    import tomllib

    assert set(tracking.KINDS) == set(config_module.TRACKERS)
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["tracking"]) == sorted(pin for _, pin in config_module.TRACKERS.values())


def fake_run(folder: Path, report_to: list[str]) -> RunDir:
    run = RunDir(folder)
    folder.mkdir()
    run.config.write_text(yaml.safe_dump({"train": {"report_to": report_to}}))
    return run


def test_without_report_to_nothing_is_written(tmp_path):
    run = fake_run(tmp_path / "run", [])
    follower = tracking.follow(run)
    run.append_log({"step": 1, "loss": 1.0})
    follower.close("completed")
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml", "log.jsonl"]
    assert run.listeners == []


def fake_tracker(name: str, calls: list, fail: Exception | None = None) -> type:
    """A tracker kind that appends each call it gets to ``calls``; with ``fail``, writing scalars raises it."""

    class Fake:
        location = {"path": name}

        def __init__(self, run):
            pass

        def params(self, params, text):
            calls.append(("params", params, text))

        def scalars(self, rows):
            if fail:
                raise fail
            calls.append(("scalars", rows))

        def final(self, metrics, step, text):
            calls.append(("final", metrics, step))

        def close(self, status):
            calls.append(("close", status))

    Fake.name = name
    return Fake


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(tracking.KINDS, "tensorboard", fake_tracker("tensorboard", calls, OSError("disk full")))
    run = fake_run(tmp_path / "run", ["tensorboard"])
    follower = tracking.follow(run)
    run.append_log({"step": 1, "loss": 1.0})
    run.append_log({"step": 2, "loss": 0.5})
    follower.close("completed")
    assert calls == [("params", {"train.report_to": '["tensorboard"]'}, run.config.read_text())]  # dropped: no close
    assert capsys.readouterr().err.count("warning: train.report_to: tensorboard: OSError: disk full") == 1
    assert len((run.log).read_text().splitlines()) == 2


def test_trackers_follow_the_log_as_the_run_writes_it(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(tracking.KINDS, "mlflow", fake_tracker("mlflow", calls))
    run = fake_run(tmp_path / "run", ["mlflow"])
    follower = tracking.follow(run)
    run.append_log({"step": 1, "epoch": 0, "loss": 1.0})
    assert calls == [("params", {"train.report_to": '["mlflow"]'}, run.config.read_text()),
                     ("scalars", [(1, {"epoch": 0.0, "loss": 1.0})])]
    run.append_log({"step": 1, "eval": {"accuracy": 0.5, "per_class": {"a": {"f1": 0.25}}, "matrix": [[1]]}})
    assert calls[-1] == ("scalars", [(1, {"eval/accuracy": 0.5, "eval/per_class/a/f1": 0.25})])
    (run.path / "metrics.json").write_text(json.dumps({"eval": {"accuracy": 0.5}, "steps": 1, "lr_source": "config"}))
    follower.close("interrupted")
    assert calls[-2:] == [("final", {"final/eval/accuracy": 0.5, "final/steps": 1.0}, 1), ("close", "interrupted")]
    assert json.loads((run.path / "tracking.json").read_text()) == {"mlflow": {"path": "mlflow"}}
