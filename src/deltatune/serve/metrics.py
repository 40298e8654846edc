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
        out: list[str] = []
        seen: set[str] = set()

        def add(name: str, kind: str, help: str, samples: list[tuple[str, dict, float]]) -> None:
            name = _metric_name(name)
            if name in seen:
                return
            seen.add(name)
            out.append(f"# HELP {PREFIX}{name} {help}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(f"{PREFIX}{name}{suffix}{_labels(labels)} {_number(value)}" for suffix, labels, value in samples)

        sizes = stats.get("batch_sizes")
        if isinstance(sizes, dict) and sizes:
            items = sorted((int(k), int(v)) for k, v in sizes.items())
            samples, running = [], 0
            for size, count in items:
                running += count
                samples.append(("_bucket", {"le": str(size)}, running))
            samples += [("_bucket", {"le": "+Inf"}, running), ("_sum", {}, sum(s * c for s, c in items)),
                        ("_count", {}, running)]
            add("batch_size", "histogram", "Requests per batch the engine ran.", samples)
        per_model = stats.get("per_model")
        if isinstance(per_model, dict):
            keys = sorted({k for v in per_model.values() if isinstance(v, dict) for k in v})
            for key in keys:
                samples = [("", {"model": str(m)}, v[key]) for m, v in sorted(per_model.items())
                           if isinstance(v, dict) and _is_number(v.get(key))]
                add(f"engine_{key}_total", "counter", f"Engine {key.replace('_', ' ')} by model, since start.",
                    samples)
        for key, value in sorted(stats.items()):
            if _is_number(value):
                kind = "counter" if key.endswith("_tokens") or key.endswith("_total") else "gauge"
                name = f"engine_{key}" + ("_total" if kind == "counter" and not key.endswith("_total") else "")
                add(name, kind, f"Engine {key.replace('_', ' ')}.", [("", {}, value)])
        return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
