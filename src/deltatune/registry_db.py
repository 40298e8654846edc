"""The run registry: every training run, tuning trial, comparison and evaluation in one SQLite file.

One ``runs`` table: typed columns for what is filtered, sorted and compared; JSON text for the
rest (config, metrics, library versions). The file is ``$DELTATUNE_REGISTRY`` or
``<cache>/registry.sqlite``. WAL mode and a busy timeout let several processes (tuning workers)
write at once; every call opens its own short connection, so it is safe across fork and spawn.

The registry is a record, never a dependency of training: a run writes to it through
:class:`Recording`, which turns any registry error into a warning on stderr.
(``methods/registry.py`` is something else: the registry of adaptation methods.)
"""

from __future__ import annotations

import json
import os
import re
import resource
import sqlite3
import sys
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RunError, Stopped
from .fs import cache_dir, user_path

KINDS = ("train", "trial", "compare", "eval", "merge")
STATUSES = ("running", "completed", "failed", "interrupted", "pruned")
OWN_DIR = ("train", "trial", "merge")  # kinds whose run directory is theirs: one row per directory
BUSY_SECONDS = 60
SCHEMA_VERSION = 3  # the last key of MIGRATIONS

_V1 = (
    """CREATE TABLE runs (
        id               TEXT PRIMARY KEY,
        path             TEXT NOT NULL,
        kind             TEXT NOT NULL CHECK (kind IN ('train', 'trial', 'compare', 'eval')),
        parent           TEXT REFERENCES runs (id),
        status           TEXT NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'interrupted')),
        model            TEXT,
        method           TEXT,
        task             TEXT,
        data_fingerprint TEXT,
        main_metric      TEXT,
        main_value       REAL,
        baseline_value   REAL,
        eval_loss        REAL,
        trainable_params INTEGER,
        total_params     INTEGER,
        delta_bytes      INTEGER,
        train_seconds    REAL,
        steps            INTEGER,
        tokens_per_s     REAL,
        peak_rss_mb      REAL,
        error            TEXT,
        started          TEXT NOT NULL,
        ended            TEXT,
        config           TEXT NOT NULL DEFAULT '{}',
        metrics          TEXT NOT NULL DEFAULT '{}',
        versions         TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX runs_path ON runs (path)",
    "CREATE INDEX runs_parent ON runs (parent)",
    "CREATE INDEX runs_started ON runs (started)",
)


def _rebuilt(table: str, version: int, old: str, new: str) -> tuple[str, ...]:
    """The statements that change a CHECK constraint, which SQLite cannot do in place: the table made again
    (``table``'s definition with ``old`` replaced by ``new``), its rows copied over, its indexes made again."""
    made = re.sub(r"CREATE TABLE runs\w* \(", f"CREATE TABLE runs_v{version} (", table, count=1).replace(old, new)
    return (made, f"INSERT INTO runs_v{version} SELECT * FROM runs", "DROP TABLE runs",
            f"ALTER TABLE runs_v{version} RENAME TO runs", *_V1[1:])


# Version 2: status 'pruned' (a tuning trial the pruner stopped).
_V2 = _rebuilt(_V1[0], 2, "'failed', 'interrupted')", "'failed', 'interrupted', 'pruned')")
# Version 3: kind 'merge' (a run written by `deltatune merge-deltas`).
_V3 = _rebuilt(_V2[0], 3, "'compare', 'eval')", "'compare', 'eval', 'merge')")
# Schema version -> the statements that bring the previous version to it. A new column is a new
# entry, e.g. 3: ("ALTER TABLE runs ADD COLUMN seed INTEGER",); never edit a released entry.
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _V1, 2: _V2, 3: _V3}
JSON_COLUMNS = ("config", "metrics", "versions")
UPDATABLE = frozenset({"status", "data_fingerprint", "main_metric", "main_value", "baseline_value", "eval_loss",
                       "trainable_params", "total_params", "delta_bytes", "train_seconds", "steps",
                       "tokens_per_s", "peak_rss_mb", "error", "started", "ended", "metrics", "versions"})


def registry_path() -> Path:
    return Path(os.environ.get("DELTATUNE_REGISTRY") or (cache_dir() / "registry.sqlite"))


# ----------------------------------------------------------------------------- connection and schema

@contextmanager
def _connect(write: bool = False) -> Iterator[sqlite3.Connection]:
    """A short connection; with ``write``, one IMMEDIATE transaction (the write lock taken up front,
    so two writers queue on the busy timeout instead of deadlocking on a lock upgrade)."""
    path = registry_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise RunError(f"run registry {path}: {exc}; set DELTATUNE_REGISTRY to a writable file") from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_SECONDS * 1000}")
        _use_wal(conn)
        _migrate(conn, path)
        if write:
            conn.execute("BEGIN IMMEDIATE")
        yield conn
        if write:
            conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise RunError(f"run registry {path}: {exc}; set DELTATUNE_REGISTRY to another file "
                       "if this one is damaged") from exc
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def _use_wal(conn: sqlite3.Connection) -> None:
    """WAL lets readers and one writer work at once. Switching needs a moment alone with the file,
    which a second process creating the registry at the same instant may not give: retry briefly."""
    for attempt in range(50):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    conn.execute("PRAGMA journal_mode = WAL")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise RunError(f"run registry {path}: schema version {version} is newer than this deltatune "
                       f"understands ({SCHEMA_VERSION}); upgrade deltatune or set DELTATUNE_REGISTRY to another file")
    conn.execute("BEGIN IMMEDIATE")
    version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have got here first
    for target in range(version + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[target]:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("COMMIT")


# ----------------------------------------------------------------------------- writing

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _config_dict(cfg: Any) -> dict:
    if isinstance(cfg, dict):
        return cfg
    from .config import to_dict

    return to_dict(cfg)


def record_start(run_dir: str | Path, cfg: Any, kind: str = "train", parent: str | None = None) -> str:
    """Record a run as running; returns its id. ``cfg`` is a Config or its plain-dict form.

    For train and trial runs the directory identifies the run: starting it again (``--resume``)
    sets the same row (keeping its kind) back to running and returns its id.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {', '.join(KINDS)}")
    config = _config_dict(cfg)
    method = config.get("method")
    path = str(user_path(run_dir).resolve())
    row = {"path": path, "kind": kind, "parent": parent, "status": "running", "model": config.get("model"),
           "method": method.get("name") if isinstance(method, dict) else method, "task": config.get("task"),
           "started": _now(), "config": json.dumps(config, default=str)}
    with _connect(write=True) as conn:
        if kind in OWN_DIR:
            old = conn.execute("SELECT id FROM runs WHERE path = ? AND kind IN ('train', 'trial', 'merge')",
                               (path,)).fetchone()
            if old:
                conn.execute("UPDATE runs SET status = 'running', error = NULL, ended = NULL, config = ?, "
                             "parent = coalesce(?, parent) WHERE id = ?", (row["config"], parent, old["id"]))
                return old["id"]
        for _ in range(10):  # 8 hex digits: a clash is rare, and then we draw again
            run_id = uuid.uuid4().hex[:8]
            try:
                conn.execute(f"INSERT INTO runs (id, {', '.join(row)}) VALUES (?{', ?' * len(row)})",
                             (run_id, *row.values()))
                return run_id
            except sqlite3.IntegrityError:
                continue
    raise RunError("run registry: could not draw an unused run id")


def record_end(run_id: str, status: str, metrics: dict | str | Path | None = None, *,
               error: str | None = None, **fields) -> None:
    """Record how a run ended, with what its directory holds.

    ``metrics``: a dict, a metrics.json path, or None (a train/trial run's own ``metrics.json``,
    if it was written). Train and trial runs also read ``data.json`` (fingerprint), ``env.json``
    (versions) and the size of ``delta/``; other kinds record the libraries of this process.
    ``fields`` set typed columns directly (e.g. ``peak_rss_mb``) and win over what was read.
    """
    if status not in STATUSES:
        raise ValueError(f"status {status!r}: use one of {', '.join(STATUSES)}")
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"record_end: unknown field(s) {', '.join(sorted(unknown))}")
    run = get(run_id, prefix=False)
    values = {k: v for k, v in _read_results(Path(run["path"]), run["kind"], run["task"], metrics).items()
              if v is not None}
    values.update(status=status, error=error, ended=_now(), **fields)
    assignments = ", ".join(f"{column} = ?" for column in values)
    with _connect(write=True) as conn:
        conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values.values(), run["id"]))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_results(path: Path, kind: str, task: str | None, metrics) -> dict:
    owns = kind in OWN_DIR
    if metrics is None:
        metrics = _read_json(path / "metrics.json") if owns else {}
    elif not isinstance(metrics, dict):
        metrics = _read_json(Path(metrics))
    ev, base = metrics.get("eval") or {}, metrics.get("baseline") or {}
    # An evaluation of a run (kind eval) is judged by the metric its run directory's metrics.json names.
    judged = metrics if "main_metric" in metrics else {**_read_json(path / "metrics.json"), "eval": ev}
    name = main_metric(judged)[0]
    fingerprint = metrics.get("data_fingerprint")
    if owns and not fingerprint:
        fingerprint = _read_json(path / "data.json").get("fingerprint")
    out = {"metrics": json.dumps(metrics, default=str) if metrics else None, "data_fingerprint": fingerprint,
           "main_metric": name if name in ev else None, "main_value": ev.get(name),
           "baseline_value": base.get(name), "eval_loss": ev.get("loss")}
    out.update({key: metrics.get(key) for key in ("trainable_params", "total_params", "train_seconds", "steps",
                                                  "tokens_per_s", "peak_rss_mb")})
    versions = _read_json(path / "env.json") if owns else library_versions()
    out["versions"] = json.dumps(versions) if versions else None
    if owns and (path / "delta").is_dir():
        out["delta_bytes"] = sum(f.stat().st_size for f in (path / "delta").rglob("*") if f.is_file())
    return out


def main_metric(metrics: dict | None) -> tuple[str, bool]:
    """(metric name, higher is better) that judges a run: what its metrics.json says (the task's
    ``main_metric``), guessed from the metric names for runs recorded before it said so."""
    metrics = metrics or {}
    said = metrics.get("main_metric")
    if isinstance(said, dict) and "name" in said:
        return said["name"], bool(said.get("maximize"))
    ev = metrics.get("eval") or {}
    for name, higher in (("accuracy", True), ("reward", True), ("perplexity", False)):
        if name in ev:
            return name, higher
    return "loss", False


def library_versions() -> dict:
    """The versions this process would use, read from package metadata (nothing heavy imported)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for package in ("deltatune", "torch", "transformers", "peft", "accelerate"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def import_run(run_dir: str | Path) -> str:
    """The id of a run directory, recording it from its files first if the registry lacks it
    (runs trained before the registry existed, or with another DELTATUNE_REGISTRY)."""
    path = user_path(run_dir).resolve()
    with _connect() as conn:
        row = conn.execute("SELECT id FROM runs WHERE path = ? AND kind IN ('train', 'trial', 'merge') "
                           "ORDER BY started DESC", (str(path),)).fetchone()
    if row:
        return row["id"]
    import yaml

    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RunError(f"{path}: cannot read config.yaml ({exc}); is this a deltatune run directory?") from exc
    state = _read_json(path / "status.json")
    run_id = record_start(path, cfg)
    started = datetime.fromtimestamp((path / "config.yaml").stat().st_mtime, timezone.utc)
    record_end(run_id, state.get("status") if state.get("status") in STATUSES else "failed",
               error=state.get("error"), started=started.isoformat(timespec="milliseconds"))
    return run_id


class Recording:
    """One run's registry record, kept safely: a registry error is a warning on stderr, never an
    exception, so recording cannot fail the run. Used as a context manager, it records the run
    as completed, interrupted (KeyboardInterrupt) or failed (any other exception, with its message)."""

    def __init__(self, run_dir: str | Path, cfg: Any, kind: str = "train", parent: str | None = None):
        self.kind = kind
        self.metrics: dict | None = None  # set before leaving the block to record these instead
        self.id = safely(record_start, run_dir, cfg, kind, parent)

    def end(self, status: str, metrics: dict | None = None, **fields) -> None:
        if self.id is not None:
            safely(record_end, self.id, status, metrics, **fields)

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        fields = {} if self.kind in OWN_DIR else {"peak_rss_mb": peak_rss_mb()}  # a train run's metrics have it
        status, error = ending(exc)
        self.end(status, self.metrics, **({"error": error} if error else {}), **fields)


def ending(exc: BaseException | None) -> tuple[str, str | None]:
    """How a block ended, as a run status and its error text: completed, interrupted (Ctrl-C),
    stopped on purpose (``errors.Stopped``, e.g. a pruned trial) or failed. The one reading of an
    ending that the registry and a run's status.json share (``train.session.tracked``)."""
    if exc is None:
        return "completed", None
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", None
    if isinstance(exc, Stopped):
        return exc.status, str(exc)
    return "failed", f"{type(exc).__name__}: {exc}"


def safely(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None with a warning on stderr if it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # the record must never cost the user a run
        print(f"warning: run registry: {exc}; the run goes on without its registry record", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- reading

def _decode(row: sqlite3.Row) -> dict:
    run = dict(row)
    for column in JSON_COLUMNS:
        run[column] = json.loads(run[column] or "{}")
    return run


def get(ref: str, prefix: bool = True) -> dict:
    """One run by id, unique id prefix, or run directory path. Unknown or ambiguous: RunError."""
    ref = str(ref)
    with _connect() as conn:
        rows = conn.execute("SELECT * FROM runs WHERE id = ?", (ref,)).fetchall()
        if not rows and prefix:
            path = str(user_path(ref).resolve())
            rows = conn.execute("SELECT * FROM runs WHERE path = ? AND kind != 'eval' ORDER BY started DESC",
                                (path,)).fetchall()[:1]
        if not rows and prefix and ref and all(c in "0123456789abcdef" for c in ref.lower()):
            rows = conn.execute("SELECT * FROM runs WHERE id LIKE ? ORDER BY started DESC",
                                (ref.lower() + "%",)).fetchall()
    if not rows:
        raise RunError(f"no run {ref!r} in the run registry ({registry_path()}); give a run id, an id prefix "
                       "or a run directory; `deltatune runs list` shows the recorded runs")
    if len(rows) > 1:
        shown = "\n".join(f"  {r['id']}  {r['kind']:7} {r['status']:11} {r['path']}" for r in rows[:10])
        more = f"\n  ... and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise RunError(f"run id prefix {ref!r} is ambiguous; {len(rows)} runs match:\n{shown}{more}\n"
                       "give more characters of the id")
    return _decode(rows[0])


def list_runs(status: str | None = None, model: str | None = None, method: str | None = None,
              task: str | None = None, kind: str | None = None, parent: str | None = None,
              limit: int | None = None) -> list[dict]:
    """Recorded runs, newest first. ``model`` matches the recorded model or its folder name."""
    where, params = [], []
    for column, value in (("status", status), ("method", method), ("task", task), ("kind", kind),
                          ("parent", parent)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if model is not None:
        where.append("(model = ? OR substr(model, -length(?) - 1) = '/' || ?)")
        params += [model, model, model]
    sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
    sql += " ORDER BY started DESC, rowid DESC" + (" LIMIT ?" if limit else "")
    with _connect() as conn:
        rows = conn.execute(sql, (*params, *([limit] if limit else []))).fetchall()
    return [_decode(r) for r in rows]


def compare(refs: list[str]) -> list[dict]:
    """The runs named by ``refs`` (ids, prefixes or paths), in that order."""
    return [get(ref) for ref in refs]


# ----------------------------------------------------------------------------- readable summaries

def _number(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _local_time(iso: str | None) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S") if iso else ""


SUMMARY_FIELDS = ("id", "kind", "model", "method", "task", "status", "accuracy", "macro_f1", "perplexity",
                  "trainable", "delta MB", "train s", "peak MB", "fingerprint", "started", "path")


def summary(run: dict) -> dict[str, str]:
    """A run's headline figures as display strings (keys from SUMMARY_FIELDS, in that order)."""
    ev, base = run["metrics"].get("eval") or {}, run["metrics"].get("baseline") or {}
    model = run["model"] or ""
    out = {"id": run["id"], "kind": run["kind"], "model": Path(model).name if "/" in model else model,
           "method": run["method"] or "", "task": run["task"] or "", "status": run["status"]}
    for key in ("accuracy", "macro_f1", "perplexity"):
        if key in ev:
            out[key] = _number(ev[key], ".4f") + (f" (base {base[key]:.4f})" if key in base else "")
    if run["trainable_params"] is not None:
        pct = 100 * run["trainable_params"] / max(run["total_params"] or 0, 1)
        out["trainable"] = f"{run['trainable_params']:,} ({pct:.2f}%)"
    out["delta MB"] = _number(None if run["delta_bytes"] is None else run["delta_bytes"] / 2**20, ".2f")
    out["train s"] = _number(run["train_seconds"], ".1f")
    out["peak MB"] = _number(run["peak_rss_mb"], ",.0f")
    out["fingerprint"] = (run["data_fingerprint"] or "")[:12]
    out["started"] = _local_time(run["started"])
    out["path"] = run["path"]
    return out


def best_index(runs: list[dict]) -> int | None:
    """Which of the runs scores best on their (shared) main metric; None when they do not share one."""
    names = {r["main_metric"] for r in runs}
    scored = [(r["main_value"], i) for i, r in enumerate(runs) if r["main_value"] is not None]
    if len(names) != 1 or not scored:
        return None
    name = names.pop()
    recorded = main_metric(runs[0].get("metrics"))
    higher = recorded[1] if recorded[0] == name else main_metric({"eval": {name: 0}})[1]
    return (max(scored) if higher else min(scored))[1]
