"""``train.report_to``: the run's log, config and final metrics, also written through TensorBoard's and
MLflow's own writers, so a run shows up where people already look.

Everything stays inside the run directory (``tensorboard/``: event files; ``mlflow/``: an MLflow store,
SQLite, with its artifacts beside it), nothing leaves the machine (MLflow's usage telemetry is switched off
before it is imported), and only the main process of a launch writes (it alone writes the run directory).

The trackers mirror log.jsonl: after each line the run appends, every new complete line is written, each
number in it a scalar at the line's step (nested values flattened: ``eval/accuracy``). A resumed run
drops the lines its checkpoint does not include, so it writes its trackers again from its log: they always
hold what log.jsonl holds. The config (config.yaml, flattened: ``train.lr``) is written with the first line,
metrics.json (its numbers as ``final/...``, and the file as text) when the run ends.
A tracker that fails is dropped with a warning: like the run registry, it never costs the run.

MLflow's own file store (``./mlruns``) refuses to open since MLflow 3.17 unless an environment variable
opts back in ("maintenance mode"); its SQLite store is the one MLflow points to, and ``mlflow ui`` opens it
as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Protocol

import yaml

from ..rundir import RunDir, is_main_process

LOCATIONS = "tracking.json"  # in the run directory: which trackers it has, where, and how to open them
_KEY = re.compile(r"[^\w\-. /]")  # what MLflow accepts in a key (TensorBoard takes the same names)
_MLFLOW_BATCH = 100  # MLflow's limit of params in one call (metrics: 1000)
_MLFLOW_VALUE = 6000  # MLflow's longest param value


class Tracker(Protocol):
    name: str
    location: dict  # tracking.json's entry: paths relative to the run directory

    def params(self, params: dict[str, str | int | float | bool], config_text: str) -> None: ...
    def scalars(self, rows: list[tuple[int, dict[str, float]]]) -> None: ...  # (step, {name: value}) in order
    def final(self, metrics: dict[str, float], step: int, metrics_text: str) -> None: ...
    def close(self, status: str) -> None: ...  # completed, failed, interrupted, or stopped


class TensorBoard:
    """Event files through torch's ``SummaryWriter``: scalars, the config as text and as TensorBoard's
    hyperparameters (its HPARAMS tab compares runs: ``tensorboard --logdir runs``), final metrics."""
    name = "tensorboard"
    location = {"path": "tensorboard"}

    def __init__(self, run: RunDir):
        from torch.utils.tensorboard import SummaryWriter

        folder = run.path / self.location["path"]
        shutil.rmtree(folder, ignore_errors=True)  # a resumed run's: written again from its log
        self.writer = SummaryWriter(log_dir=str(folder), flush_secs=10)

    def params(self, params, config_text):
        from torch.utils.tensorboard.summary import hparams

        _, session_start, _ = hparams(params, {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.add_text("config.yaml", _fenced(config_text), 0)

    def scalars(self, rows):
        for step, values in rows:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def final(self, metrics, step, metrics_text):
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.add_text("metrics.json", _fenced(metrics_text), step)

    def close(self, status):
        self.writer.close()


class MLflow:
    """One MLflow run in experiment "deltatune" of a SQLite store, through ``MlflowClient`` (no global
    active run): params, metrics with their steps, and config.yaml and metrics.json as artifacts."""
    name = "mlflow"
    location = {"path": "mlflow/mlflow.db", "artifacts": "mlflow/artifacts"}
    STATUS = {"completed": "FINISHED", "failed": "FAILED"}  # interrupted or stopped: KILLED

    def __init__(self, run: RunDir):
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # read when mlflow is imported (and after)
        from mlflow.tracking import MlflowClient

        for quiet in ("mlflow.store.db.utils", "alembic"):  # the store's creation says so at INFO
            logging.getLogger(quiet).setLevel(logging.WARNING)
        store = run.path / self.location["path"]
        store.parent.mkdir(exist_ok=True)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
        found = self.client.get_experiment_by_name("deltatune")
        experiment = found.experiment_id if found else self.client.create_experiment(
            "deltatune", artifact_location=(run.path / self.location["artifacts"]).resolve().as_uri())
        for earlier in self.client.search_runs([experiment]):  # a resumed run's: written again from its log
            self.client.delete_run(earlier.info.run_id)
        self.run_id = self.client.create_run(experiment, run_name=run.path.name).info.run_id
        self.location = {**self.location, "experiment_id": experiment, "run_id": self.run_id}

    def params(self, params, config_text):
        from mlflow.entities import Param

        items = [Param(key[:250], str(value)[:_MLFLOW_VALUE]) for key, value in params.items()]
        for start in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _MLFLOW_BATCH])
        self.client.log_text(self.run_id, config_text, "config.yaml")

    def scalars(self, rows):
        self._metrics([(step, name, value) for step, values in rows for name, value in values.items()])

    def final(self, metrics, step, metrics_text):
        self._metrics([(step, name, value) for name, value in metrics.items()])
        self.client.log_text(self.run_id, metrics_text, "metrics.json")

    def close(self, status):
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "KILLED"))

    def _metrics(self, items: list[tuple[int, str, float]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, step) for step, name, value in items]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])


KINDS: dict[str, Callable[[RunDir], Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow}


class Tracking:
    """A run's trackers, fed from its log.jsonl: ``sync`` listens to ``RunDir.append_log``. They start at the
    first line (by then config.yaml holds the resolved config, ``train.lr=auto``'s pick included), or at
    ``close`` for a run that stopped before any."""

    def __init__(self, run: RunDir):
        self.run, self.trackers, self.read, self.started = run, [], 0, False

    def sync(self, record: dict | None = None) -> None:
        """Write log.jsonl's lines not written yet (``record``, the newest, is among them)."""
        if not self._start() or not self.run.log.is_file():
            return
        with open(self.run.log, "rb") as fh:
            fh.seek(self.read)
            new = fh.read()
        new = new[:new.rfind(b"\n") + 1]  # complete lines only
        self.read += len(new)
        rows = [(line.get("step", 0), scalars(line)) for line in map(json.loads, new.splitlines())]
        if rows:
            self._each(lambda tracker: tracker.scalars(rows))

    def close(self, status: str) -> None:
        """The log's last lines, then (a completed run) metrics.json, then the end."""
        if self.sync in self.run.listeners:
            self.run.listeners.remove(self.sync)
        self.sync()
        metrics_file = self.run.path / "metrics.json"
        if self.trackers and metrics_file.is_file():
            text = metrics_file.read_text(encoding="utf-8")
            metrics = json.loads(text)
            finals = {f"final/{name}": value for name, value in scalars(metrics).items()}
            self._each(lambda tracker: tracker.final(finals, int(metrics.get("steps", 0)), text))
        self._each(lambda tracker: tracker.close(status))

    def _start(self) -> bool:
        """The trackers config.yaml's train.report_to names (once; none in the other processes of a launch),
        each starting anew: a resumed run writes them again from its log. True if any writes."""
        if self.started or not self.run.config.is_file() or not is_main_process():
            return bool(self.trackers)
        self.started = True
        try:
            text = self.run.config.read_text(encoding="utf-8")
            config = yaml.safe_load(text)  # written by the run from a validated config
            names = config["train"].get("report_to") or []
        except Exception as exc:  # never: but a tracker never costs the run
            _warn(self.run.config.name, exc)
            return False
        for name in names:
            try:
                self.trackers.append(KINDS[name](self.run))
            except Exception as exc:
                _warn(name, exc)
        if names:
            self.run.write_json(LOCATIONS, {tracker.name: tracker.location for tracker in self.trackers})
        params = {key: _param(value) for key, value in _flat(config, ".").items()}
        self._each(lambda tracker: tracker.params(params, text))
        return bool(self.trackers)

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # a tracker never costs the run
                _warn(tracker.name, exc)
                self.trackers.remove(tracker)


def follow(run: RunDir) -> Tracking:
    """The trackers of ``run`` (its config.yaml's train.report_to), listening to its log until ``close``."""
    tracking = Tracking(run)
    run.listeners.append(tracking.sync)
    return tracking


def tracking_locations(run_dir: str | Path) -> dict[str, dict]:
    """Where a run's trackers wrote, for a person or the studio to open: ``{tracker: {"path": absolute path,
    "open": the command that shows it, ...}}`` (MLflow adds ``tracking_uri``, ``experiment_id``, ``run_id``).
    Empty for a run without train.report_to. Reads tracking.json only: imports no tracker library."""
    run_dir = Path(run_dir).resolve()
    file = run_dir / LOCATIONS
    if not file.is_file():
        return {}
    found = {}
    for name, entry in json.loads(file.read_text(encoding="utf-8")).items():
        path = run_dir / entry["path"]
        if name == "mlflow":
            uri = f"sqlite:///{path}"
            found[name] = {**entry, "path": str(path), "artifacts": str(run_dir / entry["artifacts"]),
                           "tracking_uri": uri, "open": f"mlflow ui --backend-store-uri {uri}"}
        else:
            found[name] = {**entry, "path": str(path), "open": f"tensorboard --logdir {path}"}
    return found


def scalars(record: dict) -> dict[str, float]:
    """A log line's or metrics.json's numbers (not its step), nested keys joined by "/"."""
    return {_KEY.sub("_", name): float(value) for name, value in _flat(record, "/").items()
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def _flat(values: dict, sep: str, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, sep, f"{prefix}{key}{sep}"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param(value) -> str | int | float | bool:
    """A config value as a hyperparameter: numbers, text and booleans as they are, the rest as JSON."""
    if isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return json.dumps(value)


def _fenced(text: str) -> str:
    return "".join(f"    {line}\n" for line in text.splitlines())  # Markdown code: TensorBoard shows it as is


def _warn(name: str, exc: Exception) -> None:
    print(f"warning: train.report_to: {name}: {type(exc).__name__}: {exc}; the run goes on without it",
          file=sys.stderr)
