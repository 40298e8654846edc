"""Smoke test of benchmarks/run.py: both sides for 2 timed steps on tiny models; the JSON it prints.

Not timed: it checks the fields, their types and that they agree with each other (ratios from the
sides' raw values, same examples and starting weights on both sides, baseline and ours alternating),
never how fast anything is. Each side is its own Python process, so each test takes a while.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sentiment_rows, write_csv

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "run.py"
SIDE_KEYS = {"tokens_per_s", "s_per_step", "wall_s_per_step", "peak_rss_mb", "cpu_util", "final_loss", "rows_seen",
             "tokens_seen", "train_rows", "fingerprint", "trainable_params", "optimizer", "bf16", "threads",
             "steps", "timed_steps", "runs"}
LINE_KEYS = {"workload", "description", "steps", "warmup_steps", "rounds", "order", "ours_overrides", "speedup",
             "memory_ratio", "loss_rel_diff", "first_loss_rel_diff", "same_examples", "same_init", "ours",
             "baseline", "timing", "machine"}


@pytest.fixture(scope="module")
def varied_csv(tmp_path_factory) -> Path:
    """Rows of 2 to 7 words: batches differ in their token counts, so the order check means something."""
    rows = [{"text": " ".join(r["text"].split()[: 2 + i % 6]), "label": r["label"]}
            for i, r in enumerate(sentiment_rows(128))]
    return write_csv(tmp_path_factory.mktemp("bench") / "varied.csv", rows)


def harness(*args: str) -> list[dict]:
    """The harness on identical work: our default length-grouped batches would differ from the baseline's."""
    proc = subprocess.run([sys.executable, str(RUN), "--steps", "2", "--ours-override", "train.group_by_length=false",
                           *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def check_line(line: dict, rounds: int, batch: int) -> None:
    assert LINE_KEYS <= set(line)
    assert line["steps"] == 2 and line["warmup_steps"] == 1 and line["rounds"] == rounds
    assert line["order"] == ["baseline", "ours"] * rounds
    for side in ("ours", "baseline"):
        s = line[side]
        assert SIDE_KEYS <= set(s), SIDE_KEYS - set(s)
        assert len(s["runs"]) == rounds
        assert s["tokens_per_s"] > 0 and s["s_per_step"] > 0 and s["peak_rss_mb"] > 50
        assert 0 < s["cpu_util"] <= 1.5 and s["threads"] >= 1
        assert math.isfinite(s["final_loss"]) and s["final_loss"] > 0
        assert s["steps"] == 3 and s["timed_steps"] == 2 and s["rows_seen"] == 3 * batch
        for r in s["runs"]:
            assert r["order_verified"]
        assert s["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in s["runs"]))
    ours, base = line["ours"]["runs"], line["baseline"]["runs"]
    # baseline, ours, baseline, ours ...: each process started after the previous one
    starts = [r["started"] for pair in zip(base, ours) for r in pair]
    assert starts == sorted(starts)
    assert line["speedup"] == pytest.approx(statistics.median(o["tokens_per_s"] / b["tokens_per_s"]
                                                              for o, b in zip(ours, base)))
    assert line["memory_ratio"] == pytest.approx(statistics.median(o["peak_rss_mb"] / b["peak_rss_mb"]
                                                                   for o, b in zip(ours, base)))
    assert line["same_examples"] and line["same_init"]
    assert line["ours"]["tokens_seen"] == line["baseline"]["tokens_seen"]
    assert line["ours"]["trainable_params"] == line["baseline"]["trainable_params"]


def test_causal_lm_lora_two_rounds(tiny_llama, varied_csv):
    (line,) = harness("--workload", "smollm2-lora", "--model", str(tiny_llama), "--train", str(varied_csv))
    check_line(line, rounds=2, batch=4)
    # Same start, same first batch, and LoRA's B = 0 leaves the base model's output unchanged: the
    # first step's loss is the same on both sides up to float rounding (chunked vs plain loss).
    assert line["first_loss_rel_diff"] < 1e-5
    assert line["loss_rel_diff"] < 0.05


def test_classification_full_and_lora(tiny_bert, varied_csv):
    lines = harness("--workload", "minilm-cls-full,minilm-cls-lora", "--rounds", "1", "--model", str(tiny_bert),
                    "--train", str(varied_csv))
    assert [line["workload"] for line in lines] == ["minilm-cls-full", "minilm-cls-lora"]
    for line in lines:
        check_line(line, rounds=1, batch=32)
    full, lora = lines
    assert full["ours"]["trainable_params"] > lora["ours"]["trainable_params"]


def test_bad_override_fails_before_any_run(tiny_llama, varied_csv):
    proc = subprocess.run([sys.executable, str(RUN), "--workload", "smollm2-lora", "--model", str(tiny_llama),
                           "--train", str(varied_csv), "--ours-override", "train.chunked_los=false"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "chunked_loss" in proc.stderr  # "did you mean"
    assert not proc.stdout.strip()
