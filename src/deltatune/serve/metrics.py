"""/metrics: the app's own counters and the engine's stats in Prometheus' text format (version 0.0.4),
written by hand (no client library to pin).

Label values come only from the server's own vocabulary: endpoint is a route template (or "other"),
model a served name (or "" when the request named none that is served), status a number. So no
request can add a label value of its choosing, and the number of series stays bounded.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PREFIX = "deltatune_"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs.items()) + "}" if pairs else ""


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _metric_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


class Metrics:
    """Counters the app updates per request; ``render`` adds the engine's ``stats()``."""

    def __init__(self):
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = {}
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.in_flight = 0

    def observe(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, model, str(status))] += 1
        buckets = self.latency.setdefault(endpoint, [0] * (len(LATENCY_BUCKETS) + 1))
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
        buckets[-1] += 1
        self.latency_sum[endpoint] += seconds

    def tokens(self, model: str, prompt: int, completion: int = 0) -> None:
        self.prompt_tokens[model] += prompt
        self.completion_tokens[model] += completion

    def render(self, engine_stats: dict | None = None) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[tuple[str, dict, float]]) -> None:
            out.append(f"# HELP {PREFIX}{name} {help}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(f"{PREFIX}{name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in samples)

        family("requests_total", "counter", "HTTP requests answered, by endpoint, model and status.",
               [("", {"endpoint": e, "model": m, "status": s}, n) for (e, m, s), n in sorted(self.requests.items())])
        samples = []
        for endpoint, buckets in sorted(self.latency.items()):
            for bound, count in zip(LATENCY_BUCKETS, buckets):
                samples.append(("_bucket", {"endpoint": endpoint, "le": _number(bound)}, count))
            samples.append(("_bucket", {"endpoint": endpoint, "le": "+Inf"}, buckets[-1]))
            samples.append(("_sum", {"endpoint": endpoint}, self.latency_sum[endpoint]))
            samples.append(("_count", {"endpoint": endpoint}, buckets[-1]))
        family("request_duration_seconds", "histogram", "Time from request to the end of the response.", samples)
        family("prompt_tokens_total", "counter", "Prompt (input) tokens of answered requests, by model.",
               [("", {"model": m}, n) for m, n in sorted(self.prompt_tokens.items())])
        family("completion_tokens_total", "counter", "Generated tokens sent, by model.",
               [("", {"model": m}, n) for m, n in sorted(self.completion_tokens.items())])
        family("requests_in_flight", "gauge", "HTTP requests being answered now.", [("", {}, self.in_flight)])
        out += self._engine(engine_stats or {})
        return "\n".join(out) + "\n"

    def _engine(self, stats: dict) -> list[str]:
        """The engine's stats (types.EngineStats; the shape is read loosely, and what is not understood is
        left out): numbers become gauges (counters when they count tokens or requests), ``batch_sizes``
        ({size: batches}, or {operation: {size: batches}}) a histogram, {name: number} and
        {name: {count: number}} per-model counters."""
        out: list[str] = []
        seen: set[str] = set()

        def add(name: str, kind: str, help: str, samples: list[tuple[str, dict, float]]) -> None:
            name = _metric_name(name)
            if name in seen or not samples:
                return
            seen.add(name)
            out.append(f"# HELP {PREFIX}{name} {help}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(f"{PREFIX}{name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in samples)

        for key, value in sorted(stats.items()):
            try:
                if key == "batch_sizes" and isinstance(value, dict):
                    add("batch_size", "histogram", "Requests per batch the engine ran.", _batch_histogram(value))
                elif _is_number(value):
                    counter = any(word in key for word in ("tokens", "requests", "total"))
                    name = f"engine_{key}" + ("_total" if counter and not key.endswith("_total") else "")
                    add(name, "counter" if counter else "gauge", f"Engine: {key.replace('_', ' ')}.", [("", {}, value)])
                elif isinstance(value, dict) and all(_is_number(v) for v in value.values()):
                    add(f"engine_{key}_total".replace("_total_total", "_total"), "counter",
                        f"Engine: {key.replace('_', ' ')} by model, since start.",
                        [("", {"model": str(m)}, v) for m, v in sorted(value.items(), key=lambda kv: str(kv[0]))])
                elif isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()):
                    for count in sorted({k for v in value.values() for k in v}):
                        add(f"engine_{count}_total".replace("_total_total", "_total"), "counter",
                            f"Engine: {count.replace('_', ' ')} by model, since start.",
                            [("", {"model": str(m)}, v[count]) for m, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                             if _is_number(v.get(count))])
            except (TypeError, ValueError):  # a shape this reader does not know: leave it out, never fail /metrics
                continue
        return out


def _batch_histogram(sizes: dict) -> list[tuple[str, dict, float]]:
    """{size: batches} or {operation: {size: batches}} -> histogram samples (label op for the latter)."""
    groups = sizes.items() if sizes and all(isinstance(v, dict) for v in sizes.values()) else [(None, sizes)]
    samples: list[tuple[str, dict, float]] = []
    for op, counts in sorted(groups, key=lambda kv: str(kv[0])):
        base = {} if op is None else {"op": str(op)}
        items = sorted((int(k), int(v)) for k, v in counts.items())
        running = 0
        for size, count in items:
            running += count
            samples.append(("_bucket", {**base, "le": str(size)}, running))
        samples += [("_bucket", {**base, "le": "+Inf"}, running), ("_sum", base, sum(s * c for s, c in items)),
                    ("_count", base, running)]
    return samples


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
