"""Where deltatune keeps its files, and how it writes them: cache paths and atomic writes (a leaf).

A write goes to a temporary sibling and is renamed into place, so a crash at any point leaves
either the old file (or folder) or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """``$DELTATUNE_CACHE``, default ``~/.cache/deltatune``: prepared models, data, features, registry."""
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def lexicon_path() -> Path:
    """The WordNet synonym lexicon for EDA augmentation (built by ``deltatune assets --install``)."""
    return cache_dir() / "lexicon" / "wordnet-synonyms.json"


def atomic_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Build a directory in a temporary sibling, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
