"""`deltatune serve`: the app under uvicorn. SIGTERM (or Ctrl-C) drains: new requests get 503, the
engine finishes what it holds, in-flight responses complete, the process exits 0. SIGHUP reads the
serve config again and loads/unloads the difference (and re-reads the keys file).

This is the one module of the package that builds the real engine (``engine.Engine``); ``run`` takes
any object with its interface (the tests pass a fake).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import signal
import sys
import threading
from collections.abc import Callable

import uvicorn

from ..errors import ArgumentError, ConfigError, DeltatuneError
from .auth import hash_key
from .config import ServeConfig, explain, load_serve_config
from .types import EngineLike

log = logging.getLogger("deltatune.serve")


def serve_command(args) -> int:
    """``deltatune serve`` (cli.py parses the arguments)."""
    if args.explain:
        print(explain())
        return 0
    if args.hash_key:
        print(hash_key(_read_key()))
        return 0

    def read() -> ServeConfig:
        return load_serve_config(args.config, args.run, host=args.host, port=args.port, api_keys=args.api_keys,
                                 insecure_no_auth=args.insecure_no_auth)

    settings = read()
    _log_to_stderr()
    from .engine import Engine  # torch and the models: only when a server really starts

    engine = Engine(settings.runs, max_batch=settings.batching.max_batch, batch_wait_ms=settings.batching.batch_wait_ms,
                    queue_size=settings.limits.queue_size, max_prompt_tokens=settings.limits.max_prompt_tokens)
    return run(engine, settings, reload=read)


def _read_key() -> str:
    """A key from stdin (a terminal: asked for without echo); only a trailing line break is dropped."""
    key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.read()
    key = key[:-1] if key.endswith("\n") else key
    key = key[:-1] if key.endswith("\r") else key
    if not key:
        raise ArgumentError("--hash-key: no key on stdin; e.g. printf %s \"$KEY\" | deltatune serve --hash-key")
    return key


def _log_to_stderr() -> None:
    logger = logging.getLogger("deltatune.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def ready_line(url: str, names: list[str], settings: ServeConfig) -> str:
    keys = f"keys from {settings.api_keys}" if settings.api_keys else "no API keys"
    return f"deltatune serve: {url}/v1 serving {', '.join(names) or 'nothing'} ({keys}; Ctrl-C or SIGTERM drains and stops)"


class Server(uvicorn.Server):
    """uvicorn's server with deltatune's signals (no re-raised SIGTERM after a drain: exit 0) and a
    ready line once it listens."""

    def __init__(self, config: uvicorn.Config, app, on_ready: Callable[[str], None] | None = None):
        super().__init__(config)
        self.serve_state = app.state.serve
        self.on_ready = on_ready
        self.start_error: BaseException | None = None
        self.url: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._signalled = False

    async def startup(self, sockets=None) -> None:
        try:  # before uvicorn's own startup: an engine that cannot load is one error line, not a traceback
            await self.serve_state.start()
        except DeltatuneError as exc:
            self.start_error = exc
            self.should_exit = True
            return
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            if self.on_ready is not None:
                self.on_ready(self.url)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        handlers = {signal.SIGTERM: self.drain, signal.SIGINT: self.drain, signal.SIGHUP: self.reload}
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        try:
            yield
        finally:
            for sig in handlers:
                loop.remove_signal_handler(sig)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drain(self) -> None:
        """Refuse new requests, let the engine and the open responses finish, then stop (a second signal:
        stop now)."""
        if self._signalled:
            log.warning("second signal: stopping without waiting")
            self.force_exit = self.should_exit = True
            return
        self._signalled = True
        self.serve_state.draining = True  # from now on: 503, /ready too
        log.info("draining: new requests get 503; finishing the requests in flight")
        timeout = self.serve_state.settings.limits.request_timeout_s + 5

        async def drain():
            try:
                await asyncio.wait_for(self.serve_state.drain(), timeout)
            except TimeoutError:
                log.error("the engine did not finish within %s s; stopping anyway", timeout)
            except Exception:
                log.exception("draining the engine failed; stopping")
            self.should_exit = True

        self._spawn(drain())

    def reload(self) -> None:
        async def reload():
            try:
                result = await self.serve_state.reload_config()
            except ConfigError as exc:
                log.error("SIGHUP: the serve config was not applied: %s", exc)
            except Exception:
                log.exception("SIGHUP: reading the serve config again failed")
            else:
                log.info("SIGHUP: loaded %s; unloaded %s; unchanged %s", ", ".join(result["loaded"]) or "none",
                         ", ".join(result["unloaded"]) or "none", ", ".join(result["unchanged"]) or "none")

        self._spawn(reload())


def make_server(engine: EngineLike, settings: ServeConfig, reload: Callable[[], ServeConfig] | None = None,
                on_ready: Callable[[str], None] | None = None) -> Server:
    from .app import create_app

    app = create_app(engine, settings, reload=reload)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            server_header=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.limits.request_timeout_s + 5))
    return Server(config, app, on_ready)


def run(engine: EngineLike, settings: ServeConfig, reload: Callable[[], ServeConfig] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain."""
    server: Server | None = None

    def on_ready(url: str) -> None:
        names = [s.name for s in engine.served()]
        print(ready_line(url, names, settings), flush=True)

    server = make_server(engine, settings, reload, on_ready)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn could not listen (it logged why) or the app failed to start
        if server.start_error is not None:
            raise server.start_error from None
        raise DeltatuneError(f"cannot serve on {settings.host}:{settings.port} (the line above says why); choose "
                             "another --port or --host") from exc
    if server.start_error is not None:
        raise server.start_error
    return 0
