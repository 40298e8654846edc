"""What every run does around its loop, written once: check the config's paths, create the run
directory, record the run (status.json and the run registry, following how it ends), write its
inputs, and write metrics.json when it completes. ``train/run.py`` (the loop over examples) and
``train/online.py`` (PPO and GRPO) both use it.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import shutil
import sys
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import torch

from .. import __version__, allocator
from ..assets import model_fingerprint, portable_name, resolve_model
from ..config import Config, dump_yaml
from ..data.report import render_html
from ..errors import RunError
from ..fs import atomic_dir, atomic_write_text, clean_temporaries, recover_dir
from ..registry_db import Recording, ending
from ..rundir import RunDir
from ..tasks.base import Task
from . import machine_load, tracking
from .precision import bf16_enabled


def absolute_refs(cfg: Config) -> Config:
    """Local paths made absolute, so the saved config works from any directory."""
    def fix(ref: str | None) -> str | None:
        return str(Path(ref).expanduser().resolve()) if ref and Path(ref).expanduser().exists() else ref

    data = dataclasses.replace(cfg.data, train=fix(cfg.data.train), eval=fix(cfg.data.eval), test=fix(cfg.data.test))
    return dataclasses.replace(cfg, model=fix(cfg.model), data=data)


def write_inputs(run: RunDir, cfg: Config, tokenizer, report: dict, rejects: list[dict], rows: dict[str, int],
                 labels: list[str] | None = None) -> None:
    """The resolved config (first: from then on the directory can be resumed), the run's status,
    tokenizer, labels, data summary and report, rejects and versions."""
    atomic_write_text(run.config, dump_yaml(cfg))
    run.mark_running()
    atomic_dir(run.tokenizer, tokenizer.save_pretrained)
    if labels:
        run.write_json("labels.json", {"labels": labels})
    run.write_json("data.json", {"fingerprint": report["fingerprint"], "mode": report["mode"],
                                 **{f"{split}_rows": n for split, n in rows.items()},
                                 "train": cfg.data.train, "eval": cfg.data.eval})
    run.write_json("data_report.json", report)
    # Every kind of data report (streamed, preference pairs) gets the run's name and the time it was written.
    written = report.get("written") or datetime.now().isoformat(timespec="seconds")
    atomic_write_text(run.path / "data_report.html", render_html(report, name=cfg.run_name, written=written))
    if rejects:
        run.write_jsonl("rejects.jsonl", rejects)
    base = {"ref": cfg.model, "name": portable_name(cfg.model), "sha256": model_fingerprint(resolve_model(cfg.model))}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the loop's Accelerator trains
    run.write_json("env.json", {**environment(), "bf16": bf16_enabled(cfg.train.bf16, device), "base_model": base})


def recover(run: RunDir) -> None:
    """Put a run directory that a crash interrupted back into a state the run can go on from: finish
    or undo a folder swap, remove half-written files, and undo a finish that did not reach its commit
    record (``delta/`` in place but no metrics.json: the delta goes back to ``best/``, and the run
    repeats its last steps from its checkpoint, which reproduces them exactly)."""
    for folder in (run.checkpoint, run.best, run.delta, run.tokenizer):
        recover_dir(folder)
    clean_temporaries(run.path)
    if run.delta.is_dir() and not (run.path / "metrics.json").is_file():
        if run.best.exists():
            shutil.rmtree(run.delta)
        else:
            os.replace(run.delta, run.best)


def refuse_changed_data(run: RunDir, fingerprint: str) -> None:
    """A run resumes on the data it started with, or not at all."""
    if (run.path / "data.json").is_file() and run.read_json("data.json")["fingerprint"] != fingerprint:
        raise RunError(f"{run.path}: the data changed since this run started (fingerprint differs); "
                       "resuming would mix two data sets. Start a new run instead")


def finish(run: RunDir, record: Recording) -> None:
    """The last steps of a run whose commit record (metrics.json) is written: drop what only a
    resume needed and say it completed. Repeated by ``--resume`` if a crash cut them short."""
    shutil.rmtree(run.checkpoint, ignore_errors=True)
    shutil.rmtree(run.best, ignore_errors=True)
    (run.path / "best_metrics.json").unlink(missing_ok=True)
    run.set_status("completed")
    record.end("completed")  # reads metrics.json, env.json, data.json and delta/ from the run directory


@contextmanager
def tracked(run: RunDir, record: Recording, **interrupted) -> Iterator[None]:
    """An error or interruption inside the block is recorded in the run's status.json and registry
    record: interrupted (``interrupted`` says how to go on), stopped on purpose (e.g. pruned) or failed
    with the error. The block itself ends with ``finish`` when the run completes. Inside the block the
    trackers of train.report_to follow the log; they end as the run does."""
    trackers = tracking.follow(run)
    try:
        yield
    except BaseException as exc:
        status, error = ending(exc)
        details = {"interrupted": interrupted, "failed": {"error": error}}.get(status, {"reason": error})
        try:
            run.set_status(status, **details)
        except OSError as write_error:  # e.g. the disk is full: the original error matters more
            print(f"warning: {run.path}: could not record status {status}: {write_error}", file=sys.stderr)
        record.end(status, error=error)
        trackers.close(status)
        raise
    trackers.close("completed")


def write_metrics(run: RunDir, task: Task, after: dict, before: dict, trainable: int, total: int, state,
                  **extra) -> None:
    """metrics.json, the same fields for every run (``extra``: what a task or loop adds)."""
    run.write_json("metrics.json", {
        "eval": after,
        "baseline": before,
        "main_metric": task.main_metric.as_dict(),
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(state.seconds, 3),
        "tokens_per_s": round(state.tokens / max(state.seconds, 1e-9), 1),
        "steps": state.step,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "data_fingerprint": run.read_json("data.json")["fingerprint"],
        **({"nonfinite_steps_skipped": state.skipped} if state.skipped else {}),  # train.on_nonfinite=skip
        **({"machine_load": load} if (load := machine_load.report(state, torch.get_num_threads())) else {}),
        **extra,
    })


def environment() -> dict:
    """Versions of the libraries as imported (local builds included) and the thread count: env.json."""
    import accelerate
    import peft
    import transformers

    return {"deltatune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads(), "allocator": allocator.active()}
