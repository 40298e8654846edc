"""Training runs started from the studio: what the New run page offers (packaged models and data sets, model
folders and data files under the data root, never anything outside it), the run it launches (its resolved
config written into the runs folder, then `deltatune train CONFIG output_dir=RUN` as a background command),
and which command trains a run (to cancel it: Ctrl-C, so the run ends as interrupted and can resume)."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from fastapi import HTTPException

from .. import assets
from .. import registry_db as db
from ..config import Config, dump_yaml
from ..errors import RunError
from ..fs import atomic_write_text
from .datafiles import MAX_DEPTH, SKIP_DIRS, data_files
from .jobs import Job, Jobs
from .security import confined

CONFIGS = ".studio-configs"   # under the runs folder: the config of each run launched here
MAX_MODELS = 100
SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_plan_lock = threading.Lock()


def model_folders(root: Path) -> list[str]:
    """Hugging Face model folders (a config.json and safetensors weights) under ``root``, relative, sorted."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS and depth < MAX_DEPTH)
        if "config.json" in files and any(f.endswith(".safetensors") for f in files) and depth:
            found.append(str(Path(folder).relative_to(root)))
            dirs[:] = []  # a model's own subfolders are not models
            if len(found) >= MAX_MODELS:
                break
    return sorted(found)


def model_choices(root: Path) -> list[tuple[str, str]]:
    return ([(name, f"{name}: {description}") for name, (description, _) in assets.MODELS.items()]
            + [(rel, f"{rel} (folder under the data root)") for rel in model_folders(root)])


def data_choices(root: Path, none: str | None = None) -> list[tuple[str, str]]:
    """Files under the data root, then the packaged data sets; ``none``: the text of an empty choice first."""
    return (([("", none)] if none else []) + [(f, f) for f in data_files(root)]
            + [(name, f"{name} (packaged): {asset.description}") for name, asset in assets.DATASETS.items()])


def model_ref(root: Path, chosen: str) -> str:
    """The config value of a chosen model: a packaged alias, or the folder under ``root`` (400/403 else)."""
    if chosen in assets.MODELS:
        return chosen
    return str(confined(root, chosen, "model"))


def data_ref(root: Path, chosen: str, what: str) -> str:
    """The config value of a chosen data file: a packaged data set, or the file under ``root``."""
    if not chosen or chosen in assets.DATASETS:
        return chosen
    return str(confined(root, chosen, what))


def predict(cfg: Config):
    """`deltatune plan`'s prediction for ``cfg``, one at a time (it prepares the data and times this machine)."""
    from ..plan import plan

    if not _plan_lock.acquire(timeout=60):
        raise HTTPException(503, "another prediction is being made; try again in a minute")
    try:
        return plan(cfg)
    finally:
        _plan_lock.release()


def launch(jobs: Jobs, runs: Path, cfg: Config) -> tuple[Job, Path]:
    """Write ``cfg`` (resolved) under ``runs``/.studio-configs and start `deltatune train` on it into a new run
    folder under ``runs``; returns the command and the run folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = SAFE.sub("-", cfg.run_name).strip("-.") or "run"
    folder = runs / f"{name}-{stamp}"
    n = 1
    while folder.exists() or (runs / CONFIGS / f"{folder.name}.yaml").exists():
        n += 1
        folder = runs / f"{name}-{stamp}-{n}"
    config = runs / CONFIGS / f"{folder.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config, dump_yaml(cfg))
    job = jobs.start("train", ["train", str(config), f"output_dir={folder}"])
    return job, folder


def output_of(job: Job) -> Path | None:
    """The run folder a `train` command writes (its output_dir=...)."""
    for arg in job.argv:
        if arg.startswith("output_dir="):
            return Path(arg.partition("=")[2])
    return None


def run_of(job: Job) -> dict | None:
    """The registry record of the run a launched command trains, once it has started (then the command also
    counts as the run's, for the Run page)."""
    folder = output_of(job)
    if folder is None:
        return None
    try:
        run = db.get(str(folder))
    except RunError:
        return None
    job.run_id = run["id"]
    return run


def training_job(jobs: Jobs, launched: dict[str, str], run: dict) -> Job | None:
    """The command of this studio that is training ``run`` now (a launch or a resume), if any."""
    job = jobs.get(launched.get(run["path"], ""))
    if job is not None and job.run_id is None:
        run_of(job)
    for job in jobs.for_run(run["id"]):
        if job.exit_code is None and job.kind in ("train", "resume"):
            return job
    return None
