"""Where deltatune keeps its files, and how it writes them: cache paths and crash-safe writes (a leaf).

The commit protocol, for every file and folder deltatune writes: write the new version under a
temporary name, fsync it, rename it into place (a folder: the old one is renamed aside first and
deleted last), fsync the parent folder. A crash at any point leaves the old version or the new one,
never half of one; ``recover_dir`` finishes or undoes a folder swap that a crash interrupted, and
``clean_temporaries`` removes what a crash left half-written.

``DELTATUNE_FAULT_AT=N`` kills the process (SIGKILL) at its N-th commit point: the fault-injection
tests and ``benchmarks/reliability.py`` iterate N over every point of a run.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

PARTIAL, NEW, OLD = ".partial-", ".new", ".old"  # suffixes of a folder being swapped (after ".{name}")
_commits = 0


def cache_dir() -> Path:
    """``$DELTATUNE_CACHE``, default ``~/.cache/deltatune``: prepared models, data, features, registry."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def lexicon_path() -> Path:
    """The WordNet synonym lexicon for EDA augmentation (built by ``deltatune assets --install``)."""
    return cache_dir() / "lexicon" / "wordnet-synonyms.json"


def commit_point() -> None:
    """A moment at which a crash must leave a consistent state (see ``DELTATUNE_FAULT_AT``)."""
    global _commits
    _commits += 1
    target = os.environ.get("DELTATUNE_FAULT_AT")
    if target and _commits == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
    log = os.environ.get("DELTATUNE_FAULT_LOG")  # counting the points of a run
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{_commits}\n")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the platform can open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the folders themselves."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name and swap it into place: a crash at any moment leaves
    the old folder or the new one (``recover_dir`` puts back whichever a crash left aside)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}", dir=final.parent))
    new, old = _sibling(final, NEW), _sibling(final, OLD)
    try:
        build(tmp)
        fsync_tree(tmp)
        shutil.rmtree(new, ignore_errors=True)
        os.replace(tmp, new)  # complete: from here on a crash keeps the new version
        commit_point()
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            commit_point()
        os.replace(new, final)
        fsync_dir(final.parent)
        commit_point()
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def recover_dir(final: Path) -> None:
    """Finish a swap by ``atomic_dir`` that a crash interrupted: a complete new version wins, else the
    old one is put back; half-built versions are removed."""
    final = Path(final)
    new, old = _sibling(final, NEW), _sibling(final, OLD)
    if new.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(new, final)
    elif old.exists() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    for partial in final.parent.glob(f".{final.name}{PARTIAL}*"):
        shutil.rmtree(partial, ignore_errors=True)
    fsync_dir(final.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name, fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        commit_point()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the half-written files and folders that crashed writes left directly in ``folder``
    (after ``recover_dir`` has put back any folder a crash left aside); returns what was removed."""
    removed = []
    for item in Path(folder).glob(f".*{PARTIAL}*"):
        shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def _sibling(final: Path, suffix: str) -> Path:
    return final.parent / f".{final.name}{suffix}"
