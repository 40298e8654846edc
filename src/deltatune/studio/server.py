"""``deltatune studio``: the app under uvicorn, on 127.0.0.1 unless a token guards it."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import uvicorn

from .. import registry_db as db
from ..errors import ArgumentError, DeltatuneError, RunError
from .app import create_app
from .security import check_bind
from .settings import Settings

log = logging.getLogger("deltatune.studio")
TOKEN_VARIABLE = "DELTATUNE_STUDIO_TOKEN"  # the token without putting it on the command line


def studio_command(args) -> int:
    """``deltatune studio`` (cli.py parses the arguments)."""
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    check_bind(args.host, token)
    settings = Settings(host=args.host, port=args.port, runs=Path(args.runs), data_root=Path(args.data_root),
                        token=token)
    if not settings.data_root.is_dir():
        raise ArgumentError(f"studio: --data-root {args.data_root} is not a folder; give the folder that holds your "
                            "data files")
    found = import_runs(settings.runs)
    if found:
        print(f"deltatune studio: recorded {found} run folder(s) from {settings.runs} in the run registry",
              file=sys.stderr)
    _log_to_stderr()
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, server_header=False, timeout_graceful_shutdown=3)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"deltatune studio: http://{host}:{settings.port}/{'?token=' + settings.token if settings.token else ''}"
          f" (runs from {db.registry_path()}, data under {settings.data_root}; Ctrl-C stops)", flush=True)
    try:
        uvicorn.Server(config).run()
    except SystemExit as exc:  # uvicorn could not listen (it logged why)
        raise DeltatuneError(f"cannot listen on {settings.host}:{settings.port} (the line above says why); choose "
                             "another --port") from exc
    return 0


def import_runs(runs: Path, depth: int = 3) -> int:
    """Run folders under ``runs`` (down to ``depth`` levels: compare and tune keep theirs in sub-folders) that
    the registry lacks are recorded from their files, so the Runs page lists them; returns how many."""
    if not runs.is_dir():
        return 0
    before = {r["path"] for r in db.list_runs()}
    added = 0
    for level in range(1, depth + 1):
        for config in sorted(runs.glob("/".join(["*"] * level) + "/config.yaml")):
            folder = config.parent
            if str(folder.resolve()) in before or not (folder / "status.json").is_file():
                continue
            try:
                db.import_run(folder)
                added += 1
            except RunError as exc:
                print(f"warning: {folder}: not recorded ({exc})", file=sys.stderr)
    return added


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
