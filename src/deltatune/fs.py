"""Where deltatune keeps its files, and how it writes them: cache paths and crash-safe writes (a leaf).

The commit protocol, for every file and folder deltatune writes: write the new version under a
temporary name, fsync it, rename it into place (a folder: the old one is renamed aside first and
deleted last), fsync the parent folder. A crash at any point leaves the old version or the new one,
never half of one; ``recover_dir`` finishes or undoes a folder swap that a crash interrupted, and
``clean_temporaries`` removes what a crash left half-written.

``DELTATUNE_FAULT_AT=N`` kills the process (SIGKILL) at its N-th commit point: the fault-injection
tests and ``benchmarks/reliability.py`` iterate N over every point of a run.

A folder the user names (``export --out``) goes through ``replace_dir``: it never replaces a folder the
caller has not recognised as deltatune's own, and a failure leaves it as it was. A write that fails
(disk full, read-only, no permission) is an ``OSError`` naming the file deltatune meant to write
(``with_path``), not its temporary name; ``cli.main`` turns it into one line saying what to do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputError

PARTIAL, NEW, OLD = ".partial-", ".new", ".old"  # suffixes of a folder being swapped (after ".{name}")
_commits = 0


def user_path(ref: str | Path) -> Path:
    """``ref`` with ``~`` and ``~user`` expanded; a ``~user`` that names no user stays as written (a path that
    does not exist, reported as such) instead of raising."""
    try:
        return Path(ref).expanduser()
    except RuntimeError:  # "Could not determine home directory"
        return Path(ref)


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
        os.chmod(tmp, 0o777 & ~_umask())  # as a plain mkdir makes it (mkdtemp's is private)
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
    old one is put back (``clean_temporaries`` then removes half-built versions)."""
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
    fsync_dir(final.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name, fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as a plain open makes it (mkstemp's is private)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        commit_point()
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno:  # write() on a full disk names no file
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise
    fsync_dir(path.parent)


def replace_dir(final: Path, build: Callable[[Path], None], *, owned: bool = False) -> Path:
    """Write the folder ``final`` that a user named (an export, say), never losing one deltatune did not write.

    ``final`` may be missing or an empty folder; a non-empty one is replaced only when ``owned`` (the
    caller has checked that it is a previous output of the same kind and the user asked to replace it).
    The commit protocol is ``atomic_dir``'s: built under a temporary name, fsynced, the old folder renamed
    aside, the new one renamed in, the old one deleted. A failure (or Ctrl-C) at any point leaves ``final``
    as it was and removes what was built. Raises ``OutputError`` when ``final`` is a file or a non-empty
    folder that is not ``owned``; a write error is an ``OSError`` naming ``final`` or a file in it (also
    when a library such as safetensors wrapped it)."""
    final = Path(final)
    if final.is_symlink() and final.is_dir():  # write where the link points; the link stays
        final = final.resolve()
    new, old = _sibling(final, NEW), _sibling(final, OLD)
    if not os.path.lexists(final) and old.is_dir():  # a crash between the two renames of an earlier swap
        os.replace(old, final)
    if os.path.lexists(final) and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output folder")
    if final.is_dir() and not owned and any(final.iterdir()):
        raise OutputError(f"{final}: exists and is not empty; deltatune never replaces a folder it did not "
                          "write: choose another output folder")
    try:
        return atomic_dir(final, build)
    except BaseException as exc:
        if not os.path.lexists(final) and old.is_dir():  # it failed between the two renames: the old one back
            os.replace(old, final)
        shutil.rmtree(new, ignore_errors=True)
        wrapped = with_path(exc, final) if isinstance(exc, Exception) else exc
        if wrapped is exc:
            raise
        raise wrapped from exc


_TEMPORARY = re.compile(rf"^\.(?P<name>.+)(?:{re.escape(PARTIAL)}\w+|{re.escape(NEW)}|{re.escape(OLD)})$")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary name of this module's writes (``.NAME.partial-*``, ``.NAME.new``, ``.NAME.old``)."""
    return _TEMPORARY.match(name) is not None


def with_path(exc: BaseException, path: str | Path | None = None) -> BaseException:
    """``exc`` as an ``OSError`` that names the file deltatune meant to write, where it can say better than
    ``exc``: a file under a temporary name (``.NAME.partial-*``, ``.NAME.new``) is named as ``NAME``; an
    ``OSError`` without a file name (``write`` on a full disk) gets ``path``; a library's wrapped I/O
    error ("... (os error 28) at path ..." from safetensors or tokenizers, which are Rust; ``shutil.Error``
    from copytree) becomes an ``OSError``. Anything else is returned as is."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        _, destination, why = exc.args[0][0]  # copytree gathers each file's error as (source, destination, text)
        found = re.search(r"\[Errno (\d+)\]", str(why))
        if not found:
            return exc
        exc = OSError(int(found.group(1)), os.strerror(int(found.group(1))), destination)
    if not isinstance(exc, OSError):
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if not found:
            return exc
        code, said = int(found.group(1)), re.search(r'at path "([^"]+)"', str(exc))
        if path is None and said:  # safetensors names its temporary file: its folder is the one to name
            path = os.path.dirname(said.group(1)) if os.path.basename(said.group(1)).startswith(".tmp") \
                else said.group(1)
        return OSError(code, os.strerror(code)) if path is None else OSError(code, os.strerror(code), str(path))
    if exc.errno is None:
        return exc
    strerror = exc.strerror or os.strerror(exc.errno)
    for name in (exc.filename2, exc.filename):  # a copy's or rename's destination first
        if name is not None:
            parts = Path(os.fsdecode(name)).parts
            for i, part in enumerate(parts):
                match = _TEMPORARY.match(part)
                if match:
                    return OSError(exc.errno, strerror, str(Path(*parts[:i], match["name"], *parts[i + 1:])))
    if exc.filename is not None or path is None:
        return exc
    return OSError(exc.errno, strerror, str(path))  # the same subclass (PermissionError, ...)


def foreign_entries(folder: Path, ours: Callable[[Path], bool]) -> list[str]:
    """The names of the entries of ``folder`` that ``ours`` does not recognise as deltatune's (sorted; none
    when the folder is missing or empty). How a command checks a folder before it writes into it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not ours(p))


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the half-written files and folders that crashed writes left directly in ``folder``
    (after ``recover_dir`` has put back any folder a crash left aside); returns what was removed."""
    removed = []
    for item in Path(folder).glob(f".*{PARTIAL}*"):
        shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _sibling(final: Path, suffix: str) -> Path:
    return final.parent / f".{final.name}{suffix}"
