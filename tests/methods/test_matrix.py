"""The method x task matrix, generated from the registries.

Every registered method trains every registered task it can (``components.supports``) for two steps
on a tiny model, and the run it leaves behind must hold up: metrics.json names the task's main metric
with its direction, the run registry records the same metric, and the delta reloaded from the run
directory scores exactly what the run reported. A new method or task gets these tests for free:
``tests/fixtures`` holds a toy task and a toy method, registered here by importing them, that nothing
else in deltatune names.
"""

from __future__ import annotations

import json

import pytest

from deltatune import registry_db
from deltatune.components import supports
from deltatune.errors import DeltatuneError
from deltatune.inference import _base_model, load_run
from deltatune.methods import registry as methods
from deltatune.models import load_tokenizer
from deltatune.tasks import registry as tasks
from deltatune.train.run import train
from tests.conftest import qa_rows, sentiment_rows, tagged_rows, write_csv, write_jsonl
from tests.fixtures import toy_method, toy_task  # noqa: F401  (the registration lines of the toy components)
from tests.helpers import config

TOYS = {"method": toy_method.NormTuning, "task": toy_task.ToyLogistic}
PAIRS = [(m, t) for m in methods.names() for t in tasks.names() if tasks.get(t).loop == "examples"]
methods.unregister(TOYS["method"].name)  # registered again only while this module's tests run
tasks.unregister(TOYS["task"].name)
QUICK = ["train.max_steps=2", "train.batch_size=4", "data.train_limit=12", "data.eval_limit=6", "eval.forgetting=false"]
_READABLE: dict[str, object] = {}


@pytest.fixture(scope="module", autouse=True)
def _toys_registered():
    methods.register(TOYS["method"])
    tasks.register(TOYS["task"])
    yield
    methods.unregister(TOYS["method"].name)
    tasks.unregister(TOYS["task"].name)


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory) -> list:
    """The data shapes the tests have; each task trains on the first one it can read."""
    folder = tmp_path_factory.mktemp("matrix-data")
    prefs = [{"prompt": f"say something about {i}", "chosen": f"{i} is a fine number, thank you",
              "rejected": f"no {i}"} for i in range(24)]
    return [write_jsonl(folder / "qa.jsonl", qa_rows(24)), write_jsonl(folder / "tagged.jsonl", tagged_rows(24)),
            write_jsonl(folder / "prefs.jsonl", prefs), write_csv(folder / "sentiment.csv", sentiment_rows(24))]


@pytest.fixture(scope="module")
def models(tiny_bert, tiny_llama, tiny_t5) -> dict:
    """A tiny base for each kind of head (``Task.head``)."""
    return {"sequence": tiny_bert, "token": tiny_bert, "causal": tiny_llama, "seq2seq": tiny_t5}


def _readable(task: str, model, data_sets):
    if task not in _READABLE:
        _READABLE[task] = _first_readable(task, model, data_sets)
    return _READABLE[task]


def _first_readable(task: str, model, data_sets):
    for path in data_sets:
        try:
            tasks.get(task)(config(model, task, "full", path, None, *QUICK)).prepare(load_tokenizer(model))
            return path
        except DeltatuneError:
            continue
    pytest.fail(f"task {task}: none of the test data sets can be read by it")


@pytest.mark.parametrize("method,task", PAIRS, ids=[f"{m}-{t}" for m, t in PAIRS])
def test_every_method_trains_every_task_it_supports(method, task, models, data_sets, tmp_path):
    why = supports(methods.get(method), tasks.get(task))
    if why:
        pytest.skip(f"not supported: {why}")
    model = models[tasks.get(task).head]
    cfg = config(model, task, method, _readable(task, model, data_sets), tmp_path / "run", *QUICK)
    try:
        run = train(cfg)
    except DeltatuneError as exc:  # a method may refuse a base (BitFit: no biases), before anything is written
        assert not (tmp_path / "run").exists()
        pytest.skip(f"refused with a clear error: {exc}")
    metrics = json.loads((run.path / "metrics.json").read_text())
    main = tasks.get(task).main_metric
    assert metrics["main_metric"] == {"name": main.name, "maximize": main.maximize}
    assert main.name in metrics["eval"] and main.name in metrics["baseline"]
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    record = registry_db.get(str(run.path))
    assert record["status"] == "completed" and record["main_metric"] == main.name
    assert record["main_value"] == pytest.approx(metrics["eval"][main.name])

    loaded = load_run(run.path)  # the saved delta on a fresh base scores what the run reported
    data = loaded.task.prepare(loaded.tokenizer)
    examples = methods.get(method).prepare_examples(loaded.model, data.eval.examples)
    if loaded.task.needs_reference:
        with _base_model(loaded) as base:
            examples = loaded.task.with_reference(base, examples)
    again = loaded.task.evaluate(loaded.model, examples)
    assert again[main.name] == pytest.approx(metrics["eval"][main.name], rel=1e-4, abs=1e-5)
