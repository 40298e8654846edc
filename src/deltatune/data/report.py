"""The data report: what the pipeline did, in numbers (JSON) and on one page (HTML, no scripts,
plots as inline SVG so the file is self-contained and safe to open)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np

from .. import html_report as h
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
        "name": cfg.run_name, "written": datetime.now().isoformat(timespec="seconds"),
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

LABELS = {  # the report's keys in plain words (the key itself is shown beside them, in small type)
    "task": "Task (what is trained)", "mode": "Row format (what a row holds)", "name": "Run name",
    "rows_in": "Rows read", "rows_out": "Rows kept", "rows_per_split": "Rows kept per split",
    "rejected_rows": "Rows rejected as malformed or invalid (see rejects.jsonl)",
    "missing_handled": "Missing values dropped or filled", "length_filtered": "Rows dropped as too short or too long",
    "control_chars_stripped": "Control characters removed", "exact_duplicates_removed": "Rows dropped as exact duplicates",
    "near_duplicates_removed": "Rows dropped as near duplicates", "duplicates_by_split": "Duplicates dropped per split",
    "conflicting_labels": "Texts seen with conflicting labels",
    "leakage_found": "Eval/test rows that repeat a training row", "leakage_removed": "Eval/test rows removed for repeating a training row",
    "pii_redacted": "Personal data redacted (by kind)", "augmented_rows": "Rows added by augmentation",
    "augmented_by_kind": "Added rows by augmentation kind", "left_out_by_limits": "Rows left out by the row limits",
    "files": "Data files", "columns": "Columns used", "fingerprint": "Data fingerprint (sha256 of the rows used)",
    "streamed": "Read as a stream (figures on lengths from a sample)",
    "comparisons_per_split": "Preference pairs per split (each better response against each worse one)",
}
LEAK_KINDS = {"exact": "exactly", "near": "nearly", "prompt_in_train": "by its prompt"}
MODES = {  # fields.kind: the shape of a row, in words
    "classification": "a text and its class label", "text": "plain text (the model learns to continue it)",
    "sft": "a prompt and its response (the model learns the response)", "seq2seq": "an input text and its target text",
    "tokens": "a list of words with a tag per word", "prompts": "a prompt (answers are generated while training)",
    "preferences": "a prompt and responses ranked from best to worst",
}


def _fact(report: dict, key: str, shown=None) -> tuple[str, str, object]:
    return LABELS[key], key, report[key] if shown is None else shown


def _rows_section(report: dict) -> str:
    r, settings = report, report.get("settings", {})
    dropped = sum(r.get("missing_handled", {}).get("dropped", {}).values())
    removed = [(n, what) for n, what in (
        (r.get("rejected_rows", 0), "rejected as malformed"), (dropped, "dropped for a missing value"),
        (r.get("length_filtered", 0), "dropped for their length"),
        (r.get("exact_duplicates_removed", 0), "dropped as exact duplicates"),
        (r.get("near_duplicates_removed", 0), "dropped as near duplicates"),
        (r.get("leakage_removed", 0), "removed for repeating a training row")) if n]
    limits = ", ".join(f"data.{k} {h.count(settings[k])}" for k in ("train_limit", "eval_limit") if settings.get(k))
    if r.get("left_out_by_limits"):
        removed.append((r["left_out_by_limits"], f"left out by the row limits{f' ({limits})' if limits else ''}"))
    splits = ", ".join(f"{h.count(n)} {s}" for s, n in r["rows_per_split"].items() if n)
    text = (f"Of {h.plural(r['rows_in'], 'row')} read, {h.count(r['rows_out'])} ({h.percent(r['rows_out'], r['rows_in'])}) "
            f"were kept: {splits}.")
    if removed:
        text += " " + "; ".join(f"{h.count(n)} {what}" for n, what in removed) + "."
    if r.get("augmented_rows"):
        text += f" Augmentation added {h.plural(r['augmented_rows'], 'row')} (counted among those kept)."
    dropped_row = ("Rows dropped for a missing value", "missing_handled.dropped", dropped)
    keys = ["rows_in", "rejected_rows", None, "length_filtered", "exact_duplicates_removed", "near_duplicates_removed",
            "leakage_removed", "left_out_by_limits", "augmented_rows", "rows_out", "rows_per_split",
            "comparisons_per_split"]
    rows = [dropped_row if k is None else _fact(r, k) for k in keys if k is None or k in r]
    return "<h2>Rows: what was kept</h2>" + h.means(h.esc(text)) + h.facts(rows)


def _cleaning_section(report: dict) -> str:
    r = report
    missing = r.get("missing_handled", {})
    found = [(missing.get("total", 0), "missing values handled"), (r.get("control_chars_stripped", 0),
             "control characters removed"), (sum(r.get("pii_redacted", {}).values()), "personal data items redacted"),
             (r.get("conflicting_labels") or 0, "texts seen with conflicting labels")]
    said = "; ".join(f"{h.count(n)} {what}" for n, what in found if n)
    text = said + "." if said else "Cleaning found nothing to change: no missing values, control characters or personal data."
    keys = [k for k in ("missing_handled", "control_chars_stripped", "pii_redacted", "conflicting_labels") if k in r]
    return "<h2>Cleaning</h2>" + h.means(h.esc(text)) + h.facts([_fact(r, k) for k in keys])


def _leakage_section(report: dict) -> str:
    r = report
    found = {split: sum(kinds.values()) for split, kinds in r.get("leakage_found", {}).items()}
    leaked = sum(found.values())
    action = r.get("settings", {}).get("dedup", {}).get("leakage")
    if not leaked:
        text = "No evaluation or test row repeats a training row."
    else:
        where = " and ".join(f"{h.count(n)} {split}" for split, n in found.items() if n)
        kinds = Counter()
        for by_kind in r["leakage_found"].values():
            kinds.update(by_kind)
        how = ", ".join(f"{h.count(n)} {LEAK_KINDS.get(kind, kind)}" for kind, n in sorted(kinds.items()) if n)
        done = ("removed" if r.get("leakage_removed") else
                "reported, not removed (data.dedup.leakage=remove drops them)" if action != "remove" else "reported")
        text = (f"{where} {'row repeats' if leaked == 1 else 'rows repeat'} a training row ({how}): {done}.")
    dups = r.get("exact_duplicates_removed", 0) + r.get("near_duplicates_removed", 0)
    text += f" {h.plural(dups, 'duplicate row')} dropped within the splits." if dups else " No duplicate rows within the splits."
    keys = [k for k in ("duplicates_by_split", "leakage_found", "leakage_removed") if k in r]
    rows = [_fact(r, k) for k in keys]
    if r.get("leaks"):
        shown = r["leaks"][:10]
        items = "".join(f"<li>{h.esc(x['split'])} row {h.count(x['row'])} ({h.esc(Path(str(x['file'])).name)}) "
                        f"{'is' if x['kind'] == 'exact' else 'nearly is'} train row {h.count(x['train_row'])}</li>"
                        if "train_row" in x else f"<li>{h.esc(x['split'])} row {h.count(x['row'])} ({h.esc(x['kind'])})</li>"
                        for x in shown)
        more = f"<li>… and {h.count(len(r['leaks']) - len(shown))} more in data_report.json</li>" if len(r["leaks"]) > 10 else ""
        rows.append(("Examples", "leaks", f'<ul class="small">{items}{more}</ul>'))
    return "<h2>Duplicates and leakage</h2>" + h.means(h.esc(text)) + h.facts(rows)


def _tasks_section(report: dict) -> str:
    """Multi-task data (data/multitask.py): each task's own figures."""
    keys = ("rows_per_split", "exact_duplicates_removed", "leakage_found", "left_out_by_limits")
    head = "".join(f"<th>{h.label(LABELS[k], k)}</th>" for k in keys)
    rows = "".join(f"<tr><th>{h.esc(task)}</th>" + "".join(f"<td{' class=n' if isinstance(t.get(k), int) else ''}>{h.value(t.get(k))}</td>" for k in keys) + "</tr>"
                   for task, t in report["tasks"].items())
    return (f"<h2>Tasks</h2>{h.means(h.esc(h.plural(len(report['tasks']), 'task') + ' share these splits; each task’s own figures:'))}"
            f"<table><tr><th>task</th>{head}</tr>{rows}</table>")


def _labels_section(report: dict) -> str:
    parts, lines = [], []
    for split, counts in report.get("label_counts", {}).items():
        if not counts:
            continue
        parts.append(h.bars(f"Labels in {split}", counts, unit="rows"))
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        if len(counts) == 1:
            lines.append(f"{split}: every row has the one label {big}")
        elif counts[small] == 0:
            lines.append(f"{split}: the class {small} has no rows")
        elif counts[big] / counts[small] < 1.05:
            lines.append(f"{split}: balanced, {h.plural(len(counts), 'class', 'classes')} of "
                         f"{h.count(counts[small])} to {h.count(counts[big])} rows" if counts[big] != counts[small] else
                         f"{split}: balanced, {h.plural(len(counts), 'class', 'classes')} of {h.count(counts[big])} rows each")
        else:
            lines.append(f"{split}: the largest class ({big}, {h.count(counts[big])}) is "
                         f"{counts[big] / counts[small]:.1f}x the smallest ({small}, {h.count(counts[small])})")
    if not parts:
        return ""
    return ("<h2>Labels</h2>" + h.means(h.esc("Label balance: " + "; ".join(lines) + "."))
            + '<div class="figs">' + "".join(f"<div>{part}</div>" for part in parts) + "</div>")


def _lengths_section(report: dict) -> str:
    parts, lines = [], []
    for split, n in report.get("token_lengths", {}).items():
        if not n:
            continue
        sample = f" (a sample of {h.count(n['sampled_rows'])} rows)" if "sampled_rows" in n else ""
        lines.append(f"half the {split} rows{sample} have at most {h.count(n['p50'])} tokens, 95 % at most "
                     f"{h.count(n['p95'])}, the longest {h.count(n['max'])}")
        hist = n.get("histogram", {})
        plot = h.histogram(f"Token lengths in {split} (p50 {n['p50']}, p95 {n['p95']}, max {n['max']})",
                           hist.get("counts", []), hist.get("edges", []), "tokens per row", "rows",
                           markers=[(n["p50"], f"median {n['p50']}"), (n["p95"], f"p95 {n['p95']}")])
        stats = [(name, f"token_lengths.{split}.{key}", n[key]) for name, key in (
            ("Shortest", "min"), ("Median (p50)", "p50"), ("90th percentile", "p90"), ("95th percentile", "p95"),
            ("99th percentile", "p99"), ("Longest", "max"), ("Mean", "mean")) if key in n]
        parts.append(f'<div class="figs"><div>{plot}</div><div><h3>In tokens</h3>{h.facts(stats)}</div></div>')
    if not parts:
        return ""
    text = "Lengths as the model sees them (tokens after the template): " + "; ".join(lines) + "."
    return "<h2>Token lengths</h2>" + h.means(h.esc(text)) + "".join(parts)


def _details_section(report: dict) -> str:
    r = report
    mode = r.get("mode")
    rows = [_fact(r, "task"), _fact(r, "mode", f"{MODES[mode]} ({mode})" if mode in MODES else mode)] if "task" in r else []
    rows += [_fact(r, k) for k in ("files", "columns", "streamed", "fingerprint") if k in r]
    settings = (f"<details><summary>Data settings used (<code>data.*</code>)</summary>{h.value(r['settings'])}</details>"
                if r.get("settings") else "")
    return "<h2>Data and settings</h2>" + h.facts(rows) + settings


def render_html(report: dict, name: str | None = None, written=None) -> str:
    """The report as a page for people. ``name`` (the run's) and ``written`` (a datetime or ISO text) default
    to the report's own ``name`` and ``written`` (older reports lack them: the time of rendering)."""
    name = name or report.get("name")
    written = written or report.get("written")
    files = ", ".join(f"{Path(str(p)).name} ({split})" for split, p in report.get("files", {}).items())
    meta = ([("Run", name)] if name else []) + [("Task", report.get("task", "?")), ("Data", files or "?"),
                                                 ("Written" if written else "Rendered", h.when(written))]
    return h.page("Data report", meta, report_sections(report))


def report_sections(report: dict) -> str:
    """The report's sections as HTML, without the page around them (the studio shows them in its own)."""
    body = [_rows_section(report), _cleaning_section(report), _leakage_section(report)]
    if report.get("augmented_by_kind"):
        body.append("<h2>Augmentation</h2>" + h.facts([_fact(report, "augmented_rows"), _fact(report, "augmented_by_kind")]))
    if report.get("tasks"):
        body.append(_tasks_section(report))
    body += [_labels_section(report), _lengths_section(report), _details_section(report)]
    return "".join(body)
