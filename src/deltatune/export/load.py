"""An export folder back as a loaded run, so that ``deltatune predict`` (and serve) run the artefact the
user will ship: the format's runtime under the run's own task (templates, labels, decoding)."""

from __future__ import annotations

import json
from pathlib import Path

from ..configure import load_config
from ..errors import RunError
from ..inference import LoadedRun, RunParts
from ..methods import registry as methods
from ..models import load_tokenizer
from ..rundir import RunDir
from ..tasks import registry as tasks
from . import formats
from .core import MANIFEST, _sha256

LEGACY_KINDS = {"merged": "hf", "delta": "delta"}  # exports written before export.json named its format


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_export(path: str | Path, verify: bool = True) -> LoadedRun:
    """The export at ``path`` loaded by its format's runtime, with the run's task (``verify``: every file's
    SHA-256 checked against the manifest first)."""
    parts = read_export(path, verify)
    manifest = read_manifest(parts.run.path)
    model = formats.get(export_format(manifest)).load(parts.run.path, manifest, parts)
    return LoadedRun(parts.run, parts.cfg, model, parts.tokenizer, parts.task)


def read_export(path: str | Path, verify: bool = True) -> RunParts:
    """What ``inference.read_run`` says of a run, for an export folder: its config, tokenizer, method and
    task (bound to its labels); ``parts.run`` is the export folder."""
    folder = Path(path)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    if not (folder / "config.yaml").is_file():
        raise RunError(f"{folder}: this export has no config.yaml (made by an older deltatune?); export the run "
                       "again with this version to run it")
    cfg = load_config(folder / "config.yaml", check_paths=False)
    labels = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["labels"] \
        if (folder / "labels.json").is_file() else None
    tokenizer = load_tokenizer(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id, labels=labels)
    return RunParts(RunDir(folder), cfg, tokenizer, methods.get(cfg.method.name), task)


def export_format(manifest: dict) -> str:
    return manifest.get("format") or LEGACY_KINDS.get(manifest.get("kind"), "")


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{folder / MANIFEST}: cannot be read ({exc}); export the run again") from exc
    if not isinstance(manifest, dict):
        raise RunError(f"{folder / MANIFEST}: is not a deltatune export manifest; export the run again")
    return manifest


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest hashes is there with its hash: a damaged or swapped file is named."""
    for name, digest in (manifest.get("sha256") or {}).items():
        file = folder / name
        if not file.is_file():
            raise RunError(f"{file}: listed in {MANIFEST} but missing; copy the whole export folder again")
        if _sha256(file) != digest:
            raise RunError(f"{file}: its contents differ from what the export wrote (SHA-256 mismatch): damaged or "
                           "changed since; copy the export again or re-export the run")
