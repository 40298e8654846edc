"""`deltatune export`: ship a run as a plain HF model (merged) or as its delta folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from .fs import atomic_dir
from .inference import load_run
from .methods import registry
from .rundir import RunDir


def export(run_path: str | Path, out: str | Path | None, merge: bool) -> Path:
    run = RunDir(Path(run_path))
    run.require_complete()
    out = Path(out) if out else run.path / ("merged" if merge else "export")
    if merge:
        loaded = load_run(run.path)
        model = registry.get(loaded.cfg.method.name).merge(loaded.model)  # may raise CannotMerge

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
    else:
        def write(tmp: Path) -> None:
            shutil.copytree(run.delta, tmp, dirs_exist_ok=True)
            shutil.copytree(run.tokenizer, tmp / "tokenizer")
            shutil.copy(run.config, tmp / "config.yaml")
    return atomic_dir(out, write)
