"""The data report: what the pipeline did, in numbers (JSON) and on one page (HTML, no scripts,
plots as inline SVG so the file is self-contained and safe to open)."""

from __future__ import annotations

import hashlib
import html
import json
from collections import Counter

import numpy as np

from ..config import Config, to_dict


def fingerprint(splits: dict[str, list[dict]], columns: list[str]) -> str:
    """sha256 over exactly the fields used, split by split, in order: equal data, equal fingerprint."""
    h = hashlib.sha256()
    for name, rows in splits.items():
        if not rows:
            continue
        h.update(name.encode())
        for row in rows:
            h.update(json.dumps([row.get(c) for c in columns], ensure_ascii=False).encode())
    return h.hexdigest()


def _label_counts(rows: list[dict], label: str | None) -> dict[str, int]:
    if not label:
        return {}
    counts: Counter = Counter()
    for row in rows:
        value = row[label]
        counts.update(value if isinstance(value, list) else [value])
    return dict(sorted(counts.items()))


def _lengths(rows: list[dict], fields, tokenizer) -> dict:
    if tokenizer is None or not rows:
        return {}
    texts = [fields.key(r).replace("\x1f", "\n") for r in rows]
    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    edges = np.histogram_bin_edges(lengths, bins=min(20, max(1, len(set(lengths.tolist())))))
    hist, edges = np.histogram(lengths, bins=edges)
    out = {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}
    return {**out, "min": int(lengths.min()), "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1),
            "histogram": {"edges": [round(float(e), 1) for e in edges], "counts": hist.tolist()}}


def build_report(cfg: Config, splits, fields, ledger, files: dict, tokenizer) -> dict:
    augmented = sum(ledger.augmented.values())
    rows_out = sum(len(rows) for rows in splits.values())
    leakage = {s: dict(c) for s, c in ledger.leaks.items()}
    report = {
        "task": cfg.task, "mode": fields.kind, "files": files, "columns": fields.columns,
        "rows_in": ledger.rows_in,
        "rows_out": rows_out,
        "rows_per_split": {s: len(r) for s, r in splits.items()},
        "rejected_rows": len(ledger.rejects),
        "missing_handled": {"dropped": dict(ledger.dropped), "filled": dict(ledger.filled),
                            "total": sum(ledger.dropped.values()) + sum(ledger.filled.values())},
        "length_filtered": ledger.length_filtered,
        "control_chars_stripped": ledger.control_chars,
        "exact_duplicates_removed": sum(ledger.exact.values()),
        "near_duplicates_removed": sum(ledger.near.values()),
        "duplicates_by_split": {s: {"exact": ledger.exact[s], "near": ledger.near[s]} for s in splits},
        "conflicting_labels": ledger.conflicting_labels,
        "leakage_found": leakage,
        "leakage_removed": ledger.leakage_removed,
        "leaks": ledger.leak_examples[:50],
        "pii_redacted": dict(sorted(ledger.pii.items())),
        "augmented_rows": augmented,
        "augmented_by_kind": dict(ledger.augmented),
        "left_out_by_limits": ledger.limited,
        "label_counts": {s: _label_counts(r, fields.label) for s, r in splits.items() if r},
        "token_lengths": {s: _lengths(r, fields, tokenizer) for s, r in splits.items() if r},
        "fingerprint": fingerprint(splits, fields.columns),
        "settings": to_dict(cfg)["data"],
    }
    accounted = (rows_out - augmented + report["rejected_rows"] + sum(ledger.dropped.values())
                 + ledger.length_filtered + report["exact_duplicates_removed"]
                 + report["near_duplicates_removed"] + ledger.leakage_removed + ledger.limited)
    if accounted != ledger.rows_in:  # a bug in the pipeline, never the user's data
        raise AssertionError(f"data report does not add up: {ledger.rows_in} rows in, {accounted} accounted for")
    return report


# ----------------------------------------------------------------------------- inspect

def inspect_file(path: str) -> dict:
    """Rows, and per column: type, missing and distinct values, text lengths, most common values."""
    from pathlib import Path

    from .clean import is_missing
    from .load import FILE, ROW, load_table

    if (Path(path) / "data_report.json").is_file():
        report = json.loads((Path(path) / "data_report.json").read_text(encoding="utf-8"))
        path = str(Path(path) / "train.parquet")
        summary = inspect_file(path)
        return {**summary, "prepared_report": {k: report[k] for k in ("rows_in", "rows_out", "rows_per_split")}}
    malformed: list[dict] = []
    rows = load_table(path, malformed)
    if not rows:
        return {"file": str(path), "rows": 0, "malformed_rows": len(malformed), "exact_duplicate_rows": 0,
                "columns": {}, "first_problems": malformed[:5]}
    names = [c for c in rows[0] if c not in (ROW, FILE)]
    seen = Counter(json.dumps([r.get(c) for c in names], ensure_ascii=False, default=str) for r in rows)
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        present = [v for v in values if not is_missing(v)]
        text = [json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v) for v in present]
        kinds = Counter(type(v).__name__ for v in present)
        col = {"type": kinds.most_common(1)[0][0] if kinds else "empty", "missing": len(values) - len(present),
               "distinct": len(set(text))}
        if text:
            lengths = np.array([len(t) for t in text])
            col["chars"] = "/".join(str(int(np.percentile(lengths, q))) for q in (50, 95, 100))
        if text and col["distinct"] <= 50:  # looks like a label: show its distribution
            col["top"] = dict(Counter(text).most_common(10))
        columns[name] = col
    return {"file": str(path), "rows": len(rows), "malformed_rows": len(malformed),
            "exact_duplicate_rows": sum(n - 1 for n in seen.values()), "columns": columns,
            "first_problems": malformed[:5]}


# ----------------------------------------------------------------------------- HTML

def _bars(title: str, counts: dict, width: int = 520) -> str:
    if not counts:
        return ""
    top = max(counts.values()) or 1
    row_h, label_w = 22, 150
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{row_h * len(counts) + 8}">']
    for i, (name, n) in enumerate(counts.items()):
        y, w = i * row_h + 4, (width - label_w - 60) * n / top
        parts.append(f'<text x="0" y="{y + 15}" font-size="12">{html.escape(str(name))[:24]}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="16" fill="#4c78a8"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="12">{n}</text>')
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts) + "</svg>"


def _histogram(title: str, hist: dict, width: int = 520, height: int = 160) -> str:
    if not hist:
        return ""
    counts, edges = hist["counts"], hist["edges"]
    top, bar_w = max(counts) or 1, width / len(counts)
    parts = [f'<svg role="img" aria-label="{html.escape(title)}" width="{width}" height="{height + 20}">']
    for i, n in enumerate(counts):
        h = (height - 10) * n / top
        parts.append(f'<rect x="{i * bar_w:.1f}" y="{height - h:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                     f'fill="#f58518"><title>{edges[i]}-{edges[i + 1]} tokens: {n}</title></rect>')
    parts.append(f'<text x="0" y="{height + 15}" font-size="11">{edges[0]}</text>'
                 f'<text x="{width - 40}" y="{height + 15}" font-size="11">{edges[-1]} tokens</text>')
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts) + "</svg>"


def _table(pairs: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</td></tr>"
                    for k, v in pairs)
    return f"<table>{cells}</table>"


def render_html(report: dict) -> str:
    keys = ["task", "mode", "rows_in", "rows_out", "rows_per_split", "rejected_rows", "missing_handled",
            "length_filtered", "control_chars_stripped", "exact_duplicates_removed", "near_duplicates_removed",
            "conflicting_labels", "leakage_found", "leakage_removed", "pii_redacted", "augmented_rows", "augmented_by_kind",
            "left_out_by_limits", "fingerprint"]
    body = [f"<h1>Data report</h1><p>{html.escape(', '.join(f'{k}: {v}' for k, v in report['files'].items()))}</p>",
            _table([(k, report[k]) for k in keys if k in report])]  # older reports lack newer keys
    if report.get("tasks"):  # multi-task data (data/multitask.py): each task's own figures
        body.append("<h2>Tasks</h2>" + _table([(task, {k: t[k] for k in ("rows_per_split", "exact_duplicates_removed",
                                                                          "leakage_found", "left_out_by_limits")})
                                               for task, t in report["tasks"].items()]))
    for split, counts in report["label_counts"].items():
        body.append(_bars(f"Labels in {split}", counts))
    for split, lengths in report["token_lengths"].items():
        if lengths:
            body.append(_histogram(f"Token lengths in {split} (p50 {lengths['p50']}, p95 {lengths['p95']}, "
                                   f"max {lengths['max']})", lengths["histogram"]))
    style = ("body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px}")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>deltatune data report</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
