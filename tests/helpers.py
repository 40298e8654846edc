"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

from deltatune.configure import load_config

QUICK = ["train.progress=false", "train.batch_size=8", "train.eval_batch_size=16"]


def config(model: Path, task: str, method: str, train: Path, out: Path | None = None, *extra: str):
    overrides = [f"model={model}", f"task={task}", f"method.name={method}", f"data.train={train}", *QUICK, *extra]
    if out is not None:
        overrides.append(f"output_dir={out}")
    return load_config(None, overrides)
