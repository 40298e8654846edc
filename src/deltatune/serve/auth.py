"""API keys: who may call the server, which models each key may use, and how often.

The keys file is YAML: one entry per key id, holding the SHA-256 of the key (never the key itself):

    alice:
      sha256: 5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8
      models: [sentiment, base]      # names this key may use; leave out (or ['*']) for all
      rate_limit_per_minute: 120     # leave out for the serve config's limits.rate_limit_per_minute
    ops:
      sha256: ...
      admin: true                    # may call /admin/load, /admin/unload, /admin/reload

``deltatune serve --hash-key`` prints the hash of a key read from stdin (or ``printf %s "$KEY" |
sha256sum``). A request sends ``Authorization: Bearer KEY`` (as OpenAI's API); the server hashes it
and compares the hash with every entry's using ``hmac.compare_digest``, so neither the comparison's
time nor the file tells anything about a key. The rate limit is a token bucket per key id.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import build_section, doc, read_yaml
from ..errors import ConfigError
from .config import name_problem

ALL = "*"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the keys file holds it."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class KeyEntry:
    sha256: str = doc("", "Hex SHA-256 of the key (deltatune serve --hash-key prints it). Required.")
    models: list[str] = doc([ALL], "Names this key may use ('*': every served name).")
    rate_limit_per_minute: int | None = doc(None, "Requests per minute (0: no limit); unset: the serve config's "
                                                  "limits.rate_limit_per_minute.")
    admin: bool = doc(False, "May call the admin endpoints (load, unload, reload the configured runs).")


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's id and what it may do."""
    id: str
    models: frozenset[str] | None  # None: every name
    rate_limit_per_minute: int     # 0: no limit
    admin: bool = False

    def may_use(self, name: str) -> bool:
        return self.models is None or name in self.models


NOBODY = Caller("anonymous", None, 0)  # no keys file: no authentication (loopback only, config.py)


def _parse(path: str | Path, default_rate: int) -> tuple[dict[str, Caller], dict[str, bytes], list[str]]:
    raw = read_yaml(path, "KEY_ID: {sha256: ..., models: [...]}")
    problems: list[str] = []
    callers: dict[str, Caller] = {}
    hashes: dict[str, bytes] = {}
    if not raw:
        problems.append("no keys; add one (docs/serving.md), or leave api_keys out to serve without keys on a "
                        "loopback address")
    for key_id, value in raw.items():
        key_id = str(key_id)
        bad_name = name_problem(key_id, "key id", reserved=())
        if bad_name:
            problems.append(bad_name)
            continue
        entry = build_section(KeyEntry, value, f"{key_id}.", problems)
        digest = entry.sha256.strip().lower()
        if not SHA256_HEX.fullmatch(digest):
            problems.append(f"{key_id}.sha256: expected 64 hex digits (the SHA-256 of the key, from deltatune serve "
                            f"--hash-key), got {entry.sha256!r}")
            continue
        if entry.rate_limit_per_minute is not None and entry.rate_limit_per_minute < 0:
            problems.append(f"{key_id}.rate_limit_per_minute: must be 0 (no limit) or more, got "
                            f"{entry.rate_limit_per_minute}")
        twin = next((other for other, h in hashes.items() if h == bytes.fromhex(digest)), None)
        if twin is not None:
            problems.append(f"{key_id}.sha256: the same key as {twin}; give each key id its own key")
        hashes[key_id] = bytes.fromhex(digest)
        models = None if ALL in entry.models else frozenset(entry.models)
        rate = default_rate if entry.rate_limit_per_minute is None else entry.rate_limit_per_minute
        callers[key_id] = Caller(key_id, models, rate, entry.admin)
    return callers, hashes, problems


def keys_problems(path: str | Path) -> list[str]:
    """Everything wrong with a keys file, each prefixed with the file."""
    try:
        return [f"api_keys: {path}: {p}" for p in _parse(path, 0)[2]]
    except ConfigError as exc:
        return [f"api_keys: {p}" for p in exc.problems]


class Keys:
    """The keys of a keys file, hashed. ``authenticate`` takes the Authorization header."""

    def __init__(self, callers: dict[str, Caller], hashes: dict[str, bytes]):
        self.callers = callers
        self._hashes = list(hashes.items())

    @classmethod
    def read(cls, path: str | Path, default_rate: int) -> Keys:
        callers, hashes, problems = _parse(path, default_rate)
        if problems:
            raise ConfigError(problems, source=str(path))
        return cls(callers, hashes)

    def authenticate(self, authorization: bytes | str | None) -> Caller | None:
        """The caller whose key the header carries (``Bearer KEY``), or None. ``authorization``: the
        header's bytes (a key is hashed as the client sent it: UTF-8 bytes, as --hash-key hashes them)."""
        if isinstance(authorization, str):
            authorization = authorization.encode("utf-8")
        scheme, _, key = (authorization or b"").strip().partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            return None
        digest = hashlib.sha256(key).digest()
        found = None
        for key_id, expected in self._hashes:  # every entry, whatever matched: the time says nothing
            if hmac.compare_digest(digest, expected):
                found = key_id
        return self.callers[found] if found is not None else None


class RateLimiter:
    """A token bucket per key id: ``per_minute`` tokens, refilled continuously; a request takes one."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key_id: str, per_minute: int) -> float | None:
        """None if the request may go ahead, else the seconds until it may (for Retry-After)."""
        if per_minute <= 0:
            return None
        rate = per_minute / 60.0
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key_id, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
