"""Where deltatune keeps its files, and how it writes them: cache paths and atomic writes (a leaf).

A write goes to a temporary sibling and is renamed into place, so a crash at any point leaves
either the old file (or folder) or the new one, never half of one. A write that fails (disk full,
read-only, no permission) removes its temporary file or folder and raises the ``OSError`` with the
path it was writing; ``cli.main`` turns that into one line saying what to do.

Folders the user names (``export --out``) go through ``replace_dir``: it never replaces a folder
the caller has not recognised as deltatune's own output.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import OutputError


def cache_dir() -> Path:
    """``$DELTATUNE_CACHE``, default ``~/.cache/deltatune``: prepared models, data, features, registry."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def lexicon_path() -> Path:
    """The WordNet synonym lexicon for EDA augmentation (built by ``deltatune assets --install``)."""
    return cache_dir() / "lexicon" / "wordnet-synonyms.json"


# ----------------------------------------------------------------------------- durability

def fsync_dir(path: str | Path) -> None:
    """Make a rename or new entry in folder ``path`` durable (POSIX; a no-op where folders cannot be
    opened, e.g. Windows, or where the file system does not sync folders)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under ``path`` (and ``path``), so a folder renamed into place
    afterwards is whole on disk even after a power loss."""
    for root, dirs, files in os.walk(path):
        for name in files:
            file = os.path.join(root, name)
            if os.path.islink(file):
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def with_path(exc: BaseException, path: str | Path | None, tmp: str | Path | None = None) -> BaseException:
    """``exc`` as an ``OSError`` naming ``path`` when it is a write error without a useful path: an
    ``OSError`` without a file name (``write`` on a full disk) or naming a file in the temporary
    sibling ``tmp`` (named as its place in ``path`` instead), or a library's wrapped I/O error
    ("... (os error 28) at path ..." from safetensors or tokenizers, which are Rust). Anything else,
    and an ``OSError`` that already names its file, is returned as is."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        src, dst, why = exc.args[0][0]  # copytree gathers each file's error as (source, destination, str(error))
        found = re.search(r"\[Errno (\d+)\]", str(why))
        if not found:
            return exc
        exc = OSError(int(found.group(1)), os.strerror(int(found.group(1))), dst)
    if isinstance(exc, OSError):
        if exc.errno is None:
            return exc
        strerror = exc.strerror or os.strerror(exc.errno)
        names = [os.fsdecode(n) for n in (exc.filename2, exc.filename) if n is not None]  # a copy's destination first
        for name in names:
            if tmp is not None and (name == str(tmp) or name.startswith(str(tmp) + os.sep)):
                return OSError(exc.errno, strerror, str(path) + name[len(str(tmp)):])  # the same subclass
        if names or path is None:
            return exc
        return OSError(exc.errno, strerror, str(path))
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if not found:
        return exc
    code = int(found.group(1))
    if path is None:  # the library's own path, if it says one ("at path "/x/.tmpAbC": a temporary file in /x)
        said = re.search(r'at path "([^"]+)"', str(exc))
        if said:
            path = os.path.dirname(said.group(1)) if os.path.basename(said.group(1)).startswith(".tmp") \
                else said.group(1)
    return OSError(code, os.strerror(code)) if path is None else OSError(code, os.strerror(code), str(path))


def _reraise(exc: BaseException, path: Path, tmp: Path | None = None):
    wrapped = with_path(exc, path, tmp)
    if wrapped is exc:
        raise exc
    raise wrapped from exc


def _temp_sibling(final: Path, suffix: str, folder: bool) -> Path:
    """A new temporary file or folder next to ``final`` (an error names ``final``, not the temporary name)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=f".{final.name}.{suffix}", dir=final.parent))
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.{suffix}", dir=final.parent)
        os.close(fd)
        return Path(name)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(final)) from exc


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _swap_in(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` at ``final``. An existing ``final`` is renamed aside first and deleted only
    once the new one is in place, so a crash leaves the old or the new folder at ``final`` or, between
    the two renames, both as hidden siblings (``.NAME.old-*/NAME`` is the old one); never neither."""
    if not os.path.lexists(final):
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        try:
            os.replace(aside / final.name, final)  # put the old one back
            aside.rmdir()
        except OSError:
            pass
        raise
    fsync_dir(final.parent)
    _remove(aside)


# ----------------------------------------------------------------------------- writing

def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temporary sibling, then rename it into place (replacing ``final`` if it
    exists: for deltatune's own folders; a folder the user named goes through ``replace_dir``)."""
    final = Path(final)
    tmp = _temp_sibling(final, "", folder=True)
    try:
        build(tmp)
        _swap_in(tmp, final)
    except OSError as exc:
        _reraise(exc, final, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def replace_dir(final: Path, build: Callable[[Path], None], *, owned: bool = False) -> Path:
    """Write the folder ``final`` that a user named (an export, say), never losing one deltatune did not write.

    ``build`` fills a new folder, a temporary sibling of ``final``; it is fsynced and renamed into place.
    ``final`` may be missing or an empty folder; a non-empty one is replaced only when ``owned`` (the
    caller has checked that it is a previous output of the same kind and the user asked to replace it):
    the old folder is renamed aside, the new one renamed in, then the old one deleted. A failure at
    any point leaves ``final`` as it was and removes the temporary folder. Raises ``OutputError``
    when ``final`` is a file, or a non-empty folder that is not ``owned``; a write error is an
    ``OSError`` naming ``final`` (also when a library wrapped it)."""
    final = Path(final)
    if final.is_symlink() and final.is_dir():  # write where the link points; the link stays
        final = final.resolve()
    if os.path.lexists(final) and not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output folder")
    if final.is_dir() and not owned and any(final.iterdir()):
        raise OutputError(f"{final}: exists and is not empty; deltatune never replaces a folder it did not "
                          "write: choose another output folder")
    tmp = _temp_sibling(final, "new-", folder=True)
    try:
        build(tmp)
        fsync_tree(tmp)
        _swap_in(tmp, final)
    except Exception as exc:
        _reraise(exc, final, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling: flushed and fsynced, renamed into
    place, and the rename made durable. On failure the temporary file is removed and ``path`` is as it was."""
    path = Path(path)
    tmp = _temp_sibling(path, "", folder=False)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(exc, OSError):
            raise
        _reraise(exc, path, tmp)
    fsync_dir(path.parent)


def foreign_entries(folder: Path, ours: Callable[[Path], bool]) -> list[str]:
    """The names of the entries of ``folder`` that ``ours`` does not recognise as deltatune's (sorted;
    none when the folder is missing or empty). How a command checks a folder before writing into it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not ours(p))
