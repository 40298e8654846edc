"""The figures behind compare's verdicts: per-example outcomes that give back each task's main metric, the
bootstrap interval and the paired test, the recommendation, and the machine-load reading that marks runs
whose times are not comparable."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deltatune.compare import analyse
from deltatune.metrics import bootstrap_rows, interval, metric_on, outcome_record, paired_difference
from deltatune.rundir import OUTCOMES
from deltatune.train.checkpoint import LoopState
from deltatune.train.machine_load import Watch, report
from deltatune.train.run import train
from tests.helpers import config


def test_outcomes_are_kept_in_the_examples_order_and_give_back_the_metric():
    record = outcome_record("perplexity", "exp", [2, 0, 1], [6.0, 2.0, 4.0], [3.0, 1.0, 2.0])
    assert record["numerator"] == [2.0, 4.0, 6.0] and record["denominator"] == [1.0, 2.0, 3.0]
    assert metric_on(record) == pytest.approx(math.exp(2.0))
    rows = np.array([[0, 0, 0], [2, 2, 1]])
    assert metric_on(record, rows) == pytest.approx([math.exp(2.0), math.exp(16 / 8)])


@pytest.mark.parametrize("task,method,data", [("classification", "lora", "cls_csv"),
                                              ("token_classification", "lora", "tagged_jsonl"),
                                              ("causal_lm", "lora", "qa_jsonl")])
def test_a_run_keeps_its_best_delta_s_outcomes_which_give_its_main_metric(task, method, data, request, tmp_path):
    model = request.getfixturevalue("tiny_llama" if task == "causal_lm" else "tiny_bert")
    run = train(config(model, task, method, request.getfixturevalue(data), tmp_path / "run", "train.max_steps=3",
                       "train.eval_every=1"))
    metrics = run.read_json("metrics.json")
    outcomes = json.loads((run.path / OUTCOMES).read_text())
    name = metrics["main_metric"]["name"]
    assert outcomes["metric"] == name
    assert metric_on(outcomes) == pytest.approx(metrics["eval"][name], rel=1e-5)
    if task == "classification":
        assert len(outcomes["numerator"]) == run.read_json("data.json")["eval_rows"]


def test_bootstrap_interval_matches_the_normal_approximation_for_accuracy():
    rng = np.random.default_rng(1)
    correct = (rng.random(400) < 0.8).astype(float)
    record = outcome_record("accuracy", "identity", list(range(400)), correct, [1.0] * 400)
    low, high = interval(metric_on(record, bootstrap_rows(400, 4000, seed=3)))
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / 400)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)


def test_paired_difference_sees_a_consistent_gap_that_unpaired_intervals_would_hide():
    # b is right wherever a is, and on 12 more of 300 examples: the intervals of the two overlap, but on the
    # same examples b is better in every resample.
    rng = np.random.default_rng(0)
    a = (rng.random(300) < 0.7).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:12]] = 1.0
    rows = bootstrap_rows(300, 2000)
    ra, rb = (metric_on(outcome_record("accuracy", "identity", list(range(300)), x, [1.0] * 300), rows) for x in (a, b))
    assert interval(ra)[1] > interval(rb)[0]  # overlapping intervals
    diff = paired_difference(rb, ra)
    assert diff["significant"] and diff["p"] < 0.01 and diff["low"] > 0
    same = paired_difference(ra, ra + rng.normal(0, 1e-3, size=ra.shape))
    assert not same["significant"] and same["p"] > 0.05


def _entry(tmp_path: Path, method: str, per_seed: list[list[float]], delta_bytes: int) -> dict:
    runs = []
    for k, correct in enumerate(per_seed, start=1):
        run = tmp_path / method / f"seed-{k}"
        run.mkdir(parents=True)
        (run / OUTCOMES).write_text(json.dumps(outcome_record("accuracy", "identity", list(range(len(correct))),
                                                              correct, [1.0] * len(correct))))
        metrics = {"eval": {"accuracy": float(np.mean(correct))}, "baseline": {"accuracy": 0.5},
                   "main_metric": {"name": "accuracy", "maximize": True}, "data_fingerprint": f"split-{k}",
                   "trainable_params": 10, "total_params": 100, "train_seconds": 5.0 + k, "peak_rss_mb": 900.0,
                   "machine_load": {"contended": k == 2}}
        runs.append({"seed": 42 + k, "run": str(run), "metrics": metrics, "delta_bytes": delta_bytes})
    return {"method": method, "runs": runs}


def test_the_recommendation_picks_the_smallest_delta_within_the_noise_of_the_best(tmp_path):
    rng = np.random.default_rng(0)
    base = [(rng.random(200) < 0.8).astype(float) for _ in range(2)]
    worse = [np.where(rng.random(200) < 0.3, 0.0, b) for b in base]  # ~24 % fewer right: clearly worse
    close = [b.copy() for b in base]
    for c, b in zip(close, base):  # 5 right turned wrong and 4 wrong turned right of 200: within the noise
        c[np.flatnonzero(b == 1)[:5]] = 0.0
        c[np.flatnonzero(b == 0)[:4]] = 1.0
    results = [_entry(tmp_path, "full", base, 400_000_000), _entry(tmp_path, "lora", close, 7_000_000),
               _entry(tmp_path, "ia3", worse, 200_000)]
    analysis = analyse(results, resamples=2000)
    assert analysis["best"] == "full" and analysis["paired"]
    assert not analysis["methods"]["lora"]["vs_best"]["significant"]
    assert analysis["methods"]["ia3"]["vs_best"]["significant"]
    text = analysis["recommendation"]
    assert text.startswith("Pick lora:") and "Significantly worse than full: ia3" in text
    # seed 2 shared the machine: its time is left out, seed 1's (6 s) is the one shown
    assert "Fastest to train among them: full (6.0 s)" in text
    assert analysis["contended"] == ["full seed 44", "lora seed 44", "ia3 seed 44"]


def test_methods_evaluated_on_other_examples_are_not_tested_against_each_other(tmp_path):
    results = [_entry(tmp_path, "a", [[1.0, 0.0, 1.0, 1.0]], 10), _entry(tmp_path, "b", [[1.0, 0.0, 0.0, 1.0]], 5)]
    results[1]["runs"][0]["metrics"]["data_fingerprint"] = "another split"
    analysis = analyse(results)
    assert not analysis["paired"] and "ci" in analysis["methods"]["a"] and "vs_best" not in analysis["methods"]["b"]
    assert "whether the differences exceed the evaluation's noise is not known" in analysis["recommendation"]


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the machine load is read from Linux's /proc/stat")
def test_machine_load_counts_other_processes_and_not_this_one():
    # Whatever else the machine runs only adds to "other": the spinner alone is about one core of it; and
    # what this process itself uses while it spins is never counted as other processes'.
    cores = os.cpu_count()
    own = LoopState()
    watch, before = Watch(own), os.times()
    end = time.monotonic() + 2.2
    while time.monotonic() < end:
        pass
    watch.lap()
    after = os.times()
    mine = (after.user + after.system - before.user - before.system) / own.watched_seconds
    assert mine > 0.3 and report(own, threads=1)["other_cores"] + mine <= cores + 0.1
    busy = LoopState()
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        watch = Watch(busy)
        time.sleep(2.2)
        watch.lap()
    finally:
        spinner.kill()
    assert report(busy, threads=cores)["other_cores"] >= 0.8
    assert report(busy, threads=cores)["contended"] is True
    assert report(LoopState(other_cpu_seconds=0.5, watched_seconds=1.0), threads=cores)["contended"] is None  # too short
