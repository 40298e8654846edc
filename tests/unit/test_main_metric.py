"""One main metric per task, read by everyone: the loop (best delta), metrics.json, the run registry,
`tune` (default objective) and `compare` (the report's metric) agree for every registered task."""

from __future__ import annotations

import json

import pytest

from deltatune import hpo, registry_db
from deltatune.cli import main
from deltatune.compare import analyse
from deltatune.compare.report import _table
from deltatune.config import Config, TrainConfig
from deltatune.rundir import RunDir
from deltatune.tasks import registry as tasks
from deltatune.train import loop
from deltatune.train.checkpoint import LoopState
from tests.conftest import write_jsonl


class _Scripted:
    """A task whose evaluations return scripted metrics (its main metric and everything else from the real task)."""

    keeps_outcomes = False

    def __init__(self, real, results):
        self.main_metric, self.results = real.main_metric, iter(results)

    def evaluate(self, model, examples):
        return next(self.results)


class _Saver:
    def save_delta(self, model, path, options, state=None):
        path.mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("name", tasks.names())
def test_every_reader_of_the_main_metric_agrees(name, tmp_path):
    metric = tasks.get(name).main_metric
    assert hpo.parse_objectives(None, name) == [(metric.name, metric.direction)]
    metrics = {"eval": {metric.name: 1.0, "loss": 0.5}, "baseline": {metric.name: 2.0, "loss": 0.7},
               "main_metric": metric.as_dict(), "trainable_params": 1, "total_params": 10, "train_seconds": 1.0,
               "peak_rss_mb": 1.0}
    assert registry_db.main_metric(metrics) == (metric.name, metric.maximize)
    results = [{"method": "m", "runs": [{"seed": 1, "run": str(tmp_path), "metrics": metrics, "delta_bytes": 1}]}]
    assert f"<th>{metric.name} mean</th>" in _table(results, analyse(results))

    # The loop keeps the delta whose main metric is best in the metric's own direction.
    worse, better = (1.0, 2.0) if metric.maximize else (2.0, 1.0)
    results = [{metric.name: worse, "other": 0.0}, {metric.name: better, "other": 9.0}, {metric.name: worse, "other": 0.0}]
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    job = loop.Job(model=None, method=_Saver(), options=None, task=_Scripted(tasks.get(name), results),
                   train_examples=[], eval_examples=[], run=run, train=TrainConfig())
    state, best = LoopState(), None
    for step in (1, 2, 3):
        state.step = step
        best = loop._evaluate(job, None, state, best)
    assert best[metric.name] == better and json.loads((run.path / "best_metrics.json").read_text()) == best


def test_main_metric_of_a_task_instance_is_its_class_s():
    for name in tasks.names():
        cls = tasks.get(name)
        assert cls(Config(task=name)).main_metric is cls.main_metric


@pytest.mark.parametrize("task,model", [("reward", "tiny_bert"), ("dpo", "tiny_llama")])
def test_compare_works_for_preference_tasks(task, model, request, tmp_path):
    prefs = [{"prompt": f"say something about {i}", "chosen": f"{i} is a fine number, thank you",
              "rejected": f"no {i}"} for i in range(24)]
    data = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    out = tmp_path / "cmp"
    code = main(["compare", f"model={request.getfixturevalue(model)}", f"task={task}", f"data.train={data}",
                 "train.batch_size=4", "train.max_steps=2", "--methods", "lora", "--trials", "1", "--seeds", "1",
                 "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    metric = tasks.get(task).main_metric.name
    assert [r["method"] for r in results] == ["lora"] and "metrics" in results[0]["runs"][0]
    assert f"<th>{metric} mean</th>" in (out / "report.html").read_text()


def test_cli_lists_every_registered_task_with_its_main_metric(capsys):
    assert main(["tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["main_metric"], r["direction"]) for r in rows] == [
        (n, tasks.get(n).main_metric.name, tasks.get(n).main_metric.direction) for n in tasks.names()]
