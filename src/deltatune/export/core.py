"""`deltatune export`: ship a run in the format its runtime loads (``formats.FORMATS``).

Every export holds the format's files, the run's ``config.yaml`` and ``labels.json`` (so that
``deltatune predict`` runs the export as it runs the run), a model card (``README.md``) and
``export.json``: its kind, format, quantization, the run, the deltatune version, the parity check's
figures and every file with its SHA-256. The runtime's parity check runs on the folder under
construction: a failed check leaves nothing behind (``--no-check`` writes without it). An existing
non-empty ``--out`` is never deleted: it is replaced only when it is a previous export of the same kind
holding nothing but its own files, and ``--force`` says to replace it (the new export is written next to
it, then swapped in; see ``fs.replace_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from .. import __version__
from ..errors import ExportError, OutputError
from ..fs import replace_dir
from ..inference import read_run
from ..rundir import EXPORT_MANIFEST, RunDir
from . import formats
from .card import model_card

MANIFEST = EXPORT_MANIFEST


def export(run_path: str | Path, out: str | Path | None = None, merge: bool = False, force: bool = False, *,
           fmt: str | None = None, quantize: str | None = None, check: bool = True,
           command: str = "deltatune.export.export() (a library call)") -> Path:
    """Export the run at ``run_path`` in format ``fmt`` (default: ``hf`` with ``merge``, else ``delta``);
    ``command`` is what the model card says made it."""
    form = formats.get(fmt or ("hf" if merge else "delta"))
    run = RunDir(Path(run_path))
    run.require_complete()
    quantize = form.quantization(quantize)
    parts = read_run(run.path)
    reason = form.refuse(parts)
    if reason:
        raise ExportError(f"{run.path}: cannot export as {form.name}: {reason}")
    out = Path(out) if out else run.path / form.default_folder(quantize)
    _check_out(run, out)
    owned = replaceable(out, form.kind, force)

    def write(tmp: Path) -> None:
        form.write(parts, tmp, quantize)
        checked = form.check(parts, tmp, quantize) if check else None
        shutil.copy(run.config, tmp / "config.yaml")
        if (run.path / "labels.json").is_file():
            shutil.copy(run.path / "labels.json", tmp / "labels.json")
        manifest = {"kind": form.kind, "format": form.name, "quantize": quantize, "run": str(run.path.resolve()),
                    "task": parts.cfg.task, "method": parts.cfg.method.name, "base_model": str(parts.cfg.model),
                    "deltatune": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "command": command, "check": checked if check else "skipped (--no-check)"}
        (tmp / "README.md").write_text(model_card(parts, manifest, form.usage(out, parts, quantize)), encoding="utf-8")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        manifest["files"] = files
        manifest["sha256"] = {f: _sha256(tmp / f) for f in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    return replace_dir(out, write, owned=owned)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
