"""The serve config: which runs to serve under which names, where to listen, keys and limits.

YAML read with config.py's loader (a key written twice is refused) and checked like a training
config: unknown keys with a "did you mean", types coerced or refused, every problem listed at once.
Run names are simple names (they are matched, never joined to a path); run directories must be
completed runs, checked when the server starts and whenever the config is read again (SIGHUP,
``POST /admin/load``). Relative run directories are taken from the working directory, as in
training configs.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import build_section, describe, doc, read_yaml
from ..errors import ConfigError, RunError
from ..rundir import EXPORT_MANIFEST, RunDir

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
RESERVED = ("base",)  # the engine's name for an untouched base model
NAME_RULE = ("letters, digits, '.', '_' and '-', at most 64, not starting with a dot, and not 'base' (the "
             "untouched model's name)")


def name_problem(name: str, what: str = "run name", reserved: tuple[str, ...] = RESERVED) -> str | None:
    """Why ``name`` cannot name a run (or, with ``reserved=()``, a key), or None."""
    if not NAME.fullmatch(name) or name.lower() in reserved:
        rule = NAME_RULE if reserved else NAME_RULE.partition(", and not")[0]
        return f"{what} {name!r}: use {rule}"
    return None


@dataclass
class Limits:
    max_body_bytes: int = doc(1_048_576, "Largest request body in bytes (413 over it, checked before the body is "
                                         "parsed, also for chunked bodies).")
    max_prompt_tokens: int = doc(2048, "Most tokens in one prompt or input (400 over it).")
    max_tokens: int = doc(512, "Largest max_tokens / max_completion_tokens a request may ask for (400 over it); "
                               "also the default of chat completions.")
    max_n: int = doc(4, "Largest n (completions per prompt) and most prompts in one /v1/completions request.")
    max_inputs: int = doc(128, "Most inputs in one /v1/embeddings, /v1/classify or /v1/score request.")
    request_timeout_s: float = doc(60.0, "Longest a request may take (408 before a response starts; a stream "
                                         "that runs over ends with an error event).")
    rate_limit_per_minute: int = doc(600, "Requests per minute per API key, for keys that set no limit of their "
                                          "own (429 with Retry-After over it; bursts up to a minute's worth). "
                                          "0: no limit. Without an api_keys file there is no limit.")
    queue_size: int = doc(256, "Requests the engine queues before it answers 503 with Retry-After.")

    def problems(self) -> list[str]:
        at_least_one = {"max_body_bytes": self.max_body_bytes, "max_prompt_tokens": self.max_prompt_tokens,
                        "max_tokens": self.max_tokens, "max_n": self.max_n, "max_inputs": self.max_inputs,
                        "queue_size": self.queue_size}
        problems = [f"limits.{k}: must be at least 1, got {v}" for k, v in at_least_one.items() if v < 1]
        if self.request_timeout_s <= 0:
            problems.append(f"limits.request_timeout_s: must be greater than 0, got {self.request_timeout_s}")
        if self.rate_limit_per_minute < 0:
            problems.append(f"limits.rate_limit_per_minute: must be 0 (no limit) or more, got "
                            f"{self.rate_limit_per_minute}")
        return problems


@dataclass
class Batching:
    max_batch: int = doc(16, "Most requests the engine computes in one batch.")
    batch_wait_ms: float = doc(5.0, "How long the engine waits for a batch to fill before it runs a smaller one.")

    def problems(self) -> list[str]:
        problems = [] if self.max_batch >= 1 else [f"batching.max_batch: must be at least 1, got {self.max_batch}"]
        if self.batch_wait_ms < 0:
            problems.append(f"batching.batch_wait_ms: must be 0 or more, got {self.batch_wait_ms}")
        return problems


@dataclass
class ServeConfig:
    runs: dict[str, str] = doc({}, "Runs to serve: NAME: RUN_DIR (a completed run directory, or a folder "
                                   "`deltatune export` wrote). A request picks one by its model field; names use "
                                   f"{NAME_RULE}. Only these runs can ever load.")
    host: str = doc("127.0.0.1", "Address to listen on. Anything but a loopback address needs api_keys (or "
                                 "--insecure-no-auth on the command line).")
    port: int = doc(8000, "Port to listen on (0: any free port; the ready line prints it).")
    api_keys: str | None = doc(None, "YAML file of API keys (stored hashed; docs/serving.md). Unset: no "
                                     "authentication, only allowed on a loopback address.")
    cors_origins: list[str] = doc([], "Origins browsers may call from (e.g. https://app.example.com, or '*'); "
                                      "empty: CORS off.")
    limits: Limits = field(default_factory=Limits)
    batching: Batching = field(default_factory=Batching)

    def problems(self) -> list[str]:
        problems = [p for name in self.runs for p in [name_problem(name)] if p]
        problems = [f"runs: {p}" for p in problems]
        if not self.host.strip():
            problems.append("host: empty; give an address such as 127.0.0.1")
        if not 0 <= self.port <= 65535:
            problems.append(f"port: must be 0 to 65535, got {self.port}")
        if self.api_keys is not None and not self.api_keys.strip():
            problems.append("api_keys: empty; give the keys file, or leave api_keys out")
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                problems.append(f"cors_origins: {origin!r} is not an origin (scheme://host[:port], no path) or '*'")
        return problems + self.limits.problems() + self.batching.problems()


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def parse_runs(items: list[str]) -> dict[str, str]:
    """``["sst=runs/sst-lora", ...]`` (``--run NAME=RUN_DIR``) -> {name: run dir}."""
    runs: dict[str, str] = {}
    problems = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            problems.append(f"--run {item!r}: expected NAME=RUN_DIR, e.g. --run sentiment=runs/minilm-lora")
        elif name in runs:
            problems.append(f"--run {name}: given twice; give each name once")
        else:
            runs[name] = path
    if problems:
        raise ConfigError(problems, source="command line")
    return runs


def load_serve_config(path: str | Path | None = None, runs: list[str] | None = None, *, host: str | None = None,
                      port: int | None = None, api_keys: str | None = None, insecure_no_auth: bool = False,
                      check_runs: bool = True) -> ServeConfig:
    """Read the serve config file (optional) and apply the command line (``--run`` adds or replaces a name;
    ``--host``, ``--port``, ``--api-keys`` replace). Raises ConfigError listing every problem: unknown keys,
    bad names, a run directory that is not a completed run (``check_runs``), a keys file that cannot be
    used, or a non-loopback address without keys."""
    raw = read_yaml(path, "runs:, host:, api_keys:, limits:, ...") if path else {}
    source = str(path) if path else "command line"
    extra = parse_runs(runs or [])
    problems: list[str] = []
    cfg = build_section(ServeConfig, raw, "", problems)
    cfg.runs.update(extra)
    for key, value in (("host", host), ("port", port), ("api_keys", api_keys)):
        if value is not None:
            setattr(cfg, key, value)
    problems += cfg.problems()
    if not cfg.runs:
        problems.append("runs: none given; name at least one run (runs: {NAME: RUN_DIR} in the config, or "
                        "--run NAME=RUN_DIR)")
    if check_runs:
        problems += run_problems(cfg.runs)
    cfg.runs = {name: str(Path(run).expanduser().absolute()) for name, run in cfg.runs.items()}
    if cfg.api_keys:
        from .auth import keys_problems

        problems += keys_problems(cfg.api_keys)
    elif not is_loopback(cfg.host) and not insecure_no_auth:
        problems.append(f"host: {cfg.host} is not a loopback address and no api_keys file is given: anyone who "
                        "can reach it could use the server. Give --api-keys FILE (docs/serving.md), bind "
                        "127.0.0.1, or pass --insecure-no-auth if another layer authenticates")
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def run_problems(runs: dict[str, str]) -> list[str]:
    """Each folder must hold a completed run (rundir.RunDir.require_complete) or an export (its manifest is
    read when it loads); the message names it."""
    problems = []
    for name, run in runs.items():
        if name_problem(name):  # said already; its directory is not looked at
            continue
        folder = Path(run).expanduser()
        if not folder.is_dir():
            problems.append(f"runs.{name}: {run} is not a directory; give a completed run directory "
                            "(deltatune train prints its path) or an export folder (deltatune export)")
            continue
        if (folder / EXPORT_MANIFEST).is_file():
            continue
        try:
            RunDir(folder).require_complete()
        except RunError as exc:
            problems.append(f"runs.{name}: {exc}")
    return problems


def explain() -> str:
    """Every serve config key with its default and documentation (``deltatune serve --explain``)."""
    return "\n".join(describe(ServeConfig))
