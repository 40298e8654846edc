"""Runs for the studio's tests, written through the library's own writers (RunDir, registry_db) instead of
training when only their display is tested; and a studio server on a free loopback port, in a thread."""

from __future__ import annotations

import math
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deltatune import registry_db as db
from deltatune.fs import atomic_write_text
from deltatune.rundir import RunDir

LABELS = ["negative", "positive"]


def _metrics(accuracy: float, trainable: int, steps: int) -> dict:
    def figures(acc: float) -> dict:
        right = round(acc * 50)
        return {"loss": 1.2 - acc, "accuracy": acc, "macro_f1": acc - 0.01,
                "per_class": {name: {"precision": acc, "recall": acc, "f1": acc, "support": 50} for name in LABELS},
                "confusion_matrix": [[right, 50 - right], [50 - right, right]]}
    return {"eval": figures(accuracy), "baseline": figures(0.5), "main_metric": {"name": "accuracy", "maximize": True},
            "trainable_params": trainable, "total_params": 22_713_986, "train_seconds": 12.5 * steps / 10,
            "tokens_per_s": 1800.0, "steps": steps, "peak_rss_mb": 1900.0, "data_fingerprint": "ab" * 32}


def log_records(steps: int, start: int = 1, eval_every: int = 10) -> list[dict]:
    out = []
    for step in range(start, steps + 1):
        out.append({"step": step, "epoch": 0, "loss": 0.7 * math.exp(-step / 40) + 0.25 + 0.05 * math.sin(step),
                    "lr": 5e-4, "tokens": 56 * step, "tokens_per_s": 1800.0})
        if step % eval_every == 0:
            out.append({"step": step, "eval": {"loss": 0.6 * math.exp(-step / 60) + 0.3,
                                               "accuracy": 0.5 + 0.3 * (1 - math.exp(-step / 30))}})
    return out


def write_run(folder: Path, method: str, status: str = "completed", accuracy: float = 0.8, trainable: int = 338_690,
              steps: int = 60, error: str | None = None, model: str = "minilm") -> str:
    """A run folder and its registry record, as training leaves them; returns the run id."""
    run = RunDir(folder)
    folder.mkdir(parents=True)
    config = {"model": model, "task": "classification", "method": {"name": method}, "train": {"lr": 5e-4}}
    atomic_write_text(run.config, f"model: {model}\ntask: classification\nmethod:\n  name: {method}\n")
    run.write_json("data_report.json", {"rows_in": 120, "rows_out": 100, "rows_per_split": {"train": 80, "eval": 20},
                                        "exact_duplicates_removed": 20, "near_duplicates_removed": 0,
                                        "leakage_found": {"eval": {"exact": 1}}, "pii_redacted": {"email": 2},
                                        "label_counts": {"train": {"negative": 40, "positive": 40}}})
    run.write_json("baseline.json", _metrics(0.5, trainable, steps)["baseline"])
    for record in log_records(steps if status != "running" else steps // 2):
        run.append_log(record)
    run_id = db.record_start(folder, config)
    if status == "running":
        run.mark_running()  # this process: alive
        return run_id
    if status == "completed":
        (folder / "delta").mkdir()
        (folder / "delta" / "adapter_model.safetensors").write_bytes(b"\0" * (trainable * 4))
        run.write_json("metrics.json", _metrics(accuracy, trainable, steps))
    run.set_status(status, **({"error": error} if error else {}))
    db.record_end(run_id, status, error=error)
    return run_id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def studio(settings) -> Iterator[str]:
    """The studio app under uvicorn on a free loopback port, in a thread: its base URL."""
    import uvicorn

    from deltatune.studio.app import create_app

    settings.port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.port,
                                           log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the studio did not start"
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(30)
