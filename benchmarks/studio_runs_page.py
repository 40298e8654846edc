"""The studio's Runs page with 1,000 runs in the registry (issue 21): how long one render takes through the
ASGI app (FastAPI's TestClient, no network), against reading the same rows from the registry alone
(``registry_db.list_runs``) in the same run, so the page's own share is visible.

    python benchmarks/studio_runs_page.py [--runs 1000] [--repeats 9] [--out benchmarks/results/studio_runs_page.json]

The registry is a fresh file ($DELTATUNE_REGISTRY in a temporary folder) filled through the registry's own
writers (record_start / record_end with metrics like a training run's: per-class figures and a confusion
matrix, so each row decodes as much JSON as a real one). Each side runs --repeats times, alternating, after
one warm-up; medians are reported. The goal: under a second per render.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "ia3", "bitfit", "houlsby", "prompt", "full")
STATUSES = ("completed", "completed", "completed", "failed", "interrupted", "running")


def fill(n: int, folder: Path) -> None:
    from deltatune import registry_db as db

    for i in range(n):
        method, status = METHODS[i % len(METHODS)], STATUSES[i % len(STATUSES)]
        acc = 0.5 + (i % 37) / 100
        figures = {"loss": 1 - acc, "accuracy": acc, "macro_f1": acc - 0.01, "confusion_matrix": [[40, 10], [12, 38]],
                   "per_class": {c: {"precision": acc, "recall": acc, "f1": acc, "support": 50} for c in ("neg", "pos")}}
        metrics = {"eval": figures, "baseline": {**figures, "accuracy": 0.5}, "trainable_params": 1000 + 37 * i,
                   "total_params": 22_713_986, "train_seconds": 100.0 + i, "steps": 200, "peak_rss_mb": 2000.0,
                   "main_metric": {"name": "accuracy", "maximize": True}}
        run_id = db.record_start(folder / f"run-{i:04d}", {"model": "minilm", "task": "classification",
                                                           "method": {"name": method}, "train": {"lr": 5e-4}})
        if status != "running":
            db.record_end(run_id, status, metrics, error="RuntimeError: out of memory" if status == "failed" else None)


def measure(runs: int, repeats: int) -> dict:
    from fastapi.testclient import TestClient

    from deltatune import registry_db as db
    from deltatune.studio.app import create_app
    from deltatune.studio.settings import Settings

    folder = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    os.environ["DELTATUNE_REGISTRY"] = str(folder / "registry.sqlite")
    started = time.perf_counter()
    fill(runs, folder)
    filled = time.perf_counter() - started
    client = TestClient(create_app(Settings(runs=folder, data_root=folder, allowed_hosts=("testserver",))))
    assert client.get("/").status_code == 200  # warm-up
    page, rows = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        response = client.get("/")
        page.append(time.perf_counter() - t)
        assert response.status_code == 200 and response.text.count("<tr>") >= runs
        t = time.perf_counter()
        db.list_runs()
        rows.append(time.perf_counter() - t)
    return {"runs": runs, "repeats": repeats, "fill_s": round(filled, 2), "page_bytes": len(response.text),
            "page_median_s": round(statistics.median(page), 4), "page_min_s": round(min(page), 4),
            "page_max_s": round(max(page), 4), "list_runs_median_s": round(statistics.median(rows), 4),
            "load_1min": os.getloadavg()[0], "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.runs, args.repeats)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
