"""`deltatune data prepare --stream`: files larger than memory, in one pass, straight to Parquet.

Rows flow through the same row stage as the in-memory pipeline (templates, checks, cleaning,
missing values, redaction) and are written in batches, so memory holds one batch plus a 16-byte
digest per kept row (for exact de-duplication) instead of the rows themselves. What needs all
rows at once changes:

- Splits are assigned by a seeded hash of each row's text: stable, independent of file order, and
  exact duplicates always land in the same split (so they cannot leak across it); label shares
  are kept in expectation rather than to one example per class.
- Leakage of a separate eval/test file is checked exactly against the training digests; near
  duplicates, k-fold, few-shot limits and augmentation need the in-memory pipeline and are refused.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from datetime import datetime
from pathlib import Path

from ..assets import resolve_data
from ..config import Config, dump_yaml, to_dict
from ..errors import ConfigError, DataError
from .load import FILE, ROW
from .prepare import AUGMENTED, REPORT, SPLITS, Fields, FieldsFor, Ledger, RowStage, check_prepared_out, replace_prepared
from .report import render_html

SAMPLE = 5000  # rows kept (reservoir) for the token-length figures


def _refuse_unsupported(cfg: Config) -> None:
    d = cfg.data
    unsupported = {"data.dedup.near": d.dedup.near, "data.kfold": d.kfold, "data.shots_per_class": d.shots_per_class,
                   "data.train_limit": d.train_limit, "data.eval_limit": d.eval_limit,
                   "data.augment.eda": d.augment.eda, "data.augment.paraphrase": d.augment.paraphrase,
                   "data.augment.oversample": d.augment.oversample}
    problems = [f"{k}: not available with --stream (it needs every row in memory); drop --stream or unset it"
                for k, v in unsupported.items() if v]
    if problems:
        raise ConfigError(problems)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.casefold().encode("utf-8"), digest_size=16).digest()


def _bucket(text: str, seed: int, eval_share: float, test_share: float) -> str:
    value = int.from_bytes(hashlib.blake2b(f"{seed}\x1f{text.casefold()}".encode("utf-8"), digest_size=8).digest(),
                           "big") / 2 ** 64
    return "test" if value < test_share else "eval" if value < test_share + eval_share else "train"


class _Sink:
    """Batched Parquet writers, one per split, plus the running figures of the report."""

    def __init__(self, folder: Path, fields: Fields, batch_rows: int, seed: int):
        self.folder, self.fields, self.batch_rows = folder, fields, batch_rows
        self.columns = fields.columns + [ROW, FILE, AUGMENTED]
        self.buffers = {s: [] for s in SPLITS}
        self.writers, self.schemas = {}, {}
        self.counts, self.labels = Counter(), {s: Counter() for s in SPLITS}
        self.hashes = {s: hashlib.sha256(s.encode()) for s in SPLITS}
        self.sample, self.seen, self.rng = {s: [] for s in SPLITS}, Counter(), random.Random(seed)

    def add(self, split: str, row: dict) -> None:
        record = {c: row.get(c) for c in self.columns}
        self.counts[split] += 1
        self.hashes[split].update(json.dumps([row.get(c) for c in self.fields.columns], ensure_ascii=False).encode())
        if self.fields.label:
            value = row[self.fields.label]
            self.labels[split].update(value if isinstance(value, list) else [value])
        self._reservoir(split, row)
        self.buffers[split].append(record)
        if len(self.buffers[split]) >= self.batch_rows:
            self.flush(split)

    def _reservoir(self, split: str, row: dict) -> None:
        self.seen[split] += 1
        if len(self.sample[split]) < SAMPLE:
            self.sample[split].append(row)
        else:
            k = self.rng.randrange(self.seen[split])
            if k < SAMPLE:
                self.sample[split][k] = row

    def flush(self, split: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, self.buffers[split] = self.buffers[split], []
        if not rows:
            return
        if split not in self.writers:
            table = pa.Table.from_pylist(rows)
            self.schemas[split] = table.schema
            self.writers[split] = pq.ParquetWriter(self.folder / f"{split}.parquet", table.schema)
        else:
            table = pa.Table.from_pylist(rows, schema=self.schemas[split])
        self.writers[split].write_table(table)

    def close(self) -> None:
        for split in SPLITS:
            self.flush(split)
        for writer in self.writers.values():
            writer.close()

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            if self.counts[split]:
                h.update(self.hashes[split].digest())
        return h.hexdigest()


def prepare_stream(cfg: Config, out: Path, fields_for: FieldsFor, tokenizer=None, batch_rows: int = 10_000) -> dict:
    """Stream the configured files into ``out`` (written atomically); returns the report. ``fields_for``
    is the task's (``Task.fields``)."""
    _refuse_unsupported(cfg)
    d, seed = cfg.data, cfg.train.seed
    out = Path(out)
    check_prepared_out(out)  # before the work: the folder must be new, empty, or an earlier output
    files = {s: str(resolve_data(ref)) for s, ref in (("train", d.train), ("eval", d.eval), ("test", d.test)) if ref}
    eval_share = 0.0 if d.eval else d.eval_fraction
    test_share = 0.0 if d.test else d.test_fraction
    ledger = Ledger()
    stage, result = RowStage(cfg, ledger, fields_for), {}

    def build(tmp: Path) -> None:
        sink, seen = None, {s: set() for s in SPLITS}
        for source, path in files.items():
            for row in stage.stream(path):
                sink = sink or _Sink(tmp, stage.fields, batch_rows, seed)
                key = sink.fields.key(row)
                split = _bucket(key, seed, eval_share, test_share) if source == "train" else source
                digest = _digest(key)
                if d.dedup.exact and digest in seen[split]:
                    ledger.exact[split] += 1
                    continue
                if split != "train" and digest in seen["train"]:
                    ledger.leaks.setdefault(split, Counter())["exact"] += 1
                    ledger.leak_examples.append({"split": split, "kind": "exact", "file": row[FILE], "row": row[ROW]})
                    if d.dedup.leakage == "remove":
                        ledger.leakage_removed += 1
                        continue
                seen[split].add(digest)
                sink.add(split, row)
        if sink is None or not sink.counts["train"] or not sink.counts["eval"]:
            raise DataError(f"{files['train']}: no training or evaluation rows came out of the stream; "
                            "check the data and data.eval_fraction")
        sink.close()
        result.update(_report(cfg, sink, ledger, files, tokenizer))
        result.update(name=cfg.run_name, written=datetime.now().isoformat(timespec="seconds"))
        (tmp / REPORT).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "data_report.html").write_text(render_html(result), encoding="utf-8")
        (tmp / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ledger.rejects),
                                           encoding="utf-8")
        (tmp / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")

    replace_prepared(Path(out), build)
    return result


def _report(cfg: Config, sink: _Sink, ledger: Ledger, files: dict, tokenizer) -> dict:
    from .report import _lengths

    rows_out = sum(sink.counts.values())
    report = {
        "task": cfg.task, "mode": sink.fields.kind, "files": files, "columns": sink.fields.columns, "streamed": True,
        "rows_in": ledger.rows_in, "rows_out": rows_out,
        "rows_per_split": {s: sink.counts[s] for s in SPLITS},
        "rejected_rows": len(ledger.rejects),
        "missing_handled": {"dropped": dict(ledger.dropped), "filled": dict(ledger.filled),
                            "total": sum(ledger.dropped.values()) + sum(ledger.filled.values())},
        "length_filtered": ledger.length_filtered, "control_chars_stripped": ledger.control_chars,
        "exact_duplicates_removed": sum(ledger.exact.values()), "near_duplicates_removed": 0,
        "duplicates_by_split": {s: {"exact": ledger.exact[s], "near": 0} for s in SPLITS},
        "conflicting_labels": None, "leakage_found": {s: dict(c) for s, c in ledger.leaks.items()},
        "leakage_removed": ledger.leakage_removed, "leaks": ledger.leak_examples[:50],
        "pii_redacted": dict(sorted(ledger.pii.items())), "augmented_rows": 0, "augmented_by_kind": {},
        "left_out_by_limits": 0,
        "label_counts": {s: dict(sorted(c.items())) for s, c in sink.labels.items() if sink.counts[s]},
        "token_lengths": {s: {**_lengths(rows, sink.fields, tokenizer), "sampled_rows": len(rows)}
                          for s, rows in sink.sample.items() if rows and tokenizer is not None},
        "fingerprint": sink.fingerprint(),
        "settings": to_dict(cfg)["data"],
    }
    accounted = (rows_out + report["rejected_rows"] + sum(ledger.dropped.values()) + ledger.length_filtered
                 + report["exact_duplicates_removed"] + ledger.leakage_removed)
    if accounted != ledger.rows_in:  # a bug in the pipeline, never the user's data
        raise AssertionError(f"data report does not add up: {ledger.rows_in} rows in, {accounted} accounted for")
    return report
