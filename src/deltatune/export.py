"""`deltatune export`: ship a run as a plain HF model (merged) or as its delta folder.

Every export holds ``export.json`` (its kind, the run, the deltatune version and the files it
wrote). An existing non-empty ``--out`` is never deleted: it is replaced only when it is a previous
export of the same kind holding nothing but its own files, and ``--force`` says to replace it
(the new export is written next to it, then swapped in; see ``fs.replace_dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from . import __version__
from .errors import OutputError, RunError
from .fs import replace_dir
from .inference import damaged_hint, load_run
from .methods import registry
from .rundir import RunDir, check_safetensors

MANIFEST = "export.json"


def export(run_path: str | Path, out: str | Path | None, merge: bool, force: bool = False) -> Path:
    run = RunDir(Path(run_path))
    run.require_complete()
    kind = "merged" if merge else "delta"
    out = Path(out) if out else run.path / ("merged" if merge else "export")
    _check_out(run, out)
    owned = replaceable(out, kind, force)
    if merge:
        loaded = load_run(run.path)
        model = registry.get(loaded.cfg.method.name).merge(loaded.model)  # may raise CannotMerge

        def files(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            loaded.tokenizer.save_pretrained(tmp)
    else:
        hint = damaged_hint(run)
        if not run.delta.is_dir():
            raise RunError(f"{run.delta}: the run's delta folder is missing, there is nothing to export; {hint}")
        for file in sorted(run.delta.rglob("*.safetensors")):
            check_safetensors(file, hint)

        def files(tmp: Path) -> None:
            shutil.copytree(run.delta, tmp, dirs_exist_ok=True)
            shutil.copytree(run.tokenizer, tmp / "tokenizer")
            shutil.copy(run.config, tmp / "config.yaml")

    def write(tmp: Path) -> None:
        files(tmp)
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest = {"kind": kind, "run": str(run.path.resolve()), "deltatune": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": written}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return replace_dir(out, write, owned=owned)


def _check_out(run: RunDir, out: Path) -> None:
    """--out must be neither the run directory nor inside what the export reads."""
    target = out.resolve()
    if target == run.path.resolve():
        raise OutputError(f"--out {out}: is the run directory itself; choose another --out")
    for source in (run.delta, run.tokenizer):
        if target == source.resolve() or source.resolve() in target.parents:
            raise OutputError(f"--out {out}: is inside the run's {source.name}/, which the export reads; "
                              "choose another --out")


def replaceable(out: Path, kind: str, force: bool) -> bool:
    """Whether the export may replace ``out``: False when it is missing or empty (nothing to replace);
    True for a previous export of this ``kind`` holding only its own files, with ``force``; otherwise
    an ``OutputError`` saying why it is refused and what to do."""
    if not os.path.lexists(out) or (out.is_dir() and not any(out.iterdir())):
        return False
    if not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder; choose another --out")
    manifest = _manifest(out)
    if manifest is None:
        raise OutputError(f"--out {out}: exists, is not empty and is not a deltatune export (no readable "
                          f"{MANIFEST}); deltatune never deletes a folder it did not write: choose another --out, "
                          "or empty it yourself")
    if manifest.get("kind") != kind:
        raise OutputError(f"--out {out}: holds a {manifest.get('kind')} export, not a {kind} one; --force "
                          f"replaces only an export of the same kind: choose another --out")
    listed = {*manifest.get("files", []), MANIFEST}
    extra = sorted(name for name in (p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
                   if name not in listed)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise OutputError(f"--out {out}: a previous {kind} export, but it also holds files the export did not "
                          f"write ({shown}); move them out or choose another --out")
    if not force:
        raise OutputError(f"--out {out}: already holds a {kind} export (of {manifest.get('run')}); pass --force "
                          "to replace it, or choose another --out")
    return True


def _manifest(out: Path) -> dict | None:
    try:
        data = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files", []), list) else None
