"""Read a table from CSV, TSV, JSON, JSONL, Parquet or a saved `datasets` folder into rows that
remember where they came from.

Each row is a dict with the file's columns plus ``_row``: the row number as the user would find
it in the file (CSV/TSV: the line number, header = line 1; JSONL: the line number; JSON array,
Parquet and `datasets` folders: the 1-based record index) and ``_file``. Every later message
points at them.

A malformed row (wrong number of CSV fields, a JSONL line that is not an object) raises a
DataError, or, when the caller passes a ``rejects`` list (``data.on_error=skip``), is recorded
there with its file, row and reason and skipped. A file that cannot be read at all always raises.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from ..errors import DataError

ROW = "_row"
FILE = "_file"


class _Rows:
    """Stamps good rows with their source; routes malformed ones to ``rejects`` (skip) or raises (fail)."""

    def __init__(self, path: Path, rejects: list[dict] | None):
        self.path, self.rejects = path, rejects

    def make(self, row: dict, number: int) -> dict:
        row[ROW], row[FILE] = number, str(self.path)
        return row

    def bad(self, number: int, reason: str) -> None:
        if self.rejects is None:
            raise DataError(f"{self.path}: line {number}: {reason}")
        self.rejects.append({"file": str(self.path), "row": number, "reason": reason})


def iter_table(path: str | Path, rejects: list[dict] | None = None) -> Iterator[dict]:
    """Rows one at a time. CSV, TSV, JSONL, Parquet and `datasets` folders are read incrementally, so
    a file larger than memory streams; a JSON array is parsed whole (JSONL is the streaming form)."""
    path = Path(path)
    if path.is_dir():
        yield from _read_datasets_folder(path)
        return
    if not path.is_file():
        raise DataError(f"{path}: file does not exist; check data.train / data.eval in your config")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(readers)}")
    try:
        yield from readers[suffix](path, _Rows(path, rejects))
    except RecursionError as exc:  # json nesting thousands deep
        raise DataError(f"{path}: nested too deeply to read; records must be flat objects") from exc


def load_table(path: str | Path, rejects: list[dict] | None = None) -> list[dict]:
    before = len(rejects) if rejects is not None else 0
    rows = list(iter_table(path, rejects))
    if not rows and not (rejects and len(rejects) > before):
        raise DataError(f"{path}: the file has no data rows; a data set needs at least one example")
    return rows


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        _not_utf8(path, raw, exc)


def _not_utf8(path: Path, raw: bytes, exc: UnicodeDecodeError, first_line: int = 1):
    line = raw[: exc.start].count(b"\n") + first_line
    raise DataError(f"{path}: line {line}: bytes that are not UTF-8 ({raw[exc.start:exc.start + 4]!r} "
                    f"at byte {exc.start}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from exc


def _utf8_lines(path: Path) -> Iterator[str]:
    """Decoded lines (with their endings), read incrementally; bad bytes are reported by line."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _not_utf8(path, raw, exc, first_line=number)


def _read_csv(path: Path, out: _Rows) -> Iterator[dict]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(_utf8_lines(path), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(f"{path}: line 1: malformed header: {exc}") from exc
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if header.count(h) > 1})
    if repeated:
        raise DataError(f"{path}: line 1: the header names {', '.join(map(repr, repeated))} more than once; "
                        "give every column its own name")
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # e.g. a field over the size limit: the reader cannot go on
            raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from exc
        if not record or all(not cell.strip() for cell in record):
            continue  # blank lines are not rows
        if len(record) != len(header):
            out.bad(reader.line_num, f"{len(record)} fields but the header has {len(header)} "
                    f"({', '.join(header)}); quote fields that contain "
                    f"{'tabs' if delimiter == chr(9) else 'commas'}")
            continue
        yield out.make(dict(zip(header, record)), reader.line_num)


def _read_jsonl(path: Path, out: _Rows) -> Iterator[dict]:
    for number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            out.bad(number, f"not valid JSON ({getattr(exc, 'msg', exc)}); each line must be one JSON object")
            continue
        if isinstance(record, dict):
            yield out.make(record, number)
        else:
            out.bad(number, f"expected a JSON object with named fields, got {type(record).__name__}")


def _read_json(path: Path, out: _Rows) -> Iterator[dict]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects (or JSONL, one object per line)")
    for number, record in enumerate(data, start=1):
        if isinstance(record, dict):
            yield out.make(record, number)
        else:
            out.bad(number, f"expected a JSON object with named fields, got {type(record).__name__}")


def _read_parquet(path: Path, out: _Rows) -> Iterator[dict]:
    import pyarrow.parquet as pq

    number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield out.make(row, number)
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc


def _read_datasets_folder(path: Path) -> Iterator[dict]:
    """A folder saved with ``Dataset.save_to_disk`` (memory-mapped Arrow, read row by row)."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: a saved DatasetDict with splits {', '.join(splits)}; point data.train / "
                        f"data.eval at one split's folder, e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise DataError(f"{path}: a folder, but not one saved by datasets' save_to_disk (no state.json) nor "
                        "by `deltatune data prepare` (no data_report.json)")
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for a damaged folder
        raise DataError(f"{path}: cannot read the saved dataset: {exc}") from exc
    for number, row in enumerate(dataset, start=1):
        row[ROW], row[FILE] = number, str(path)
        yield row


def require_columns(rows: list[dict], path: str, columns: list[tuple[str, str]]) -> None:
    """Fail naming the file, the missing column and the config key that chose it."""
    present = [c for c in rows[0] if c != ROW]
    for column, key in columns:
        if column not in rows[0]:
            raise DataError(f"{path}: no column {column!r} (set by {key}); the file has: "
                            f"{', '.join(present)}. Set {key}=<column> to the right one")


def cell(row: dict, column: str, path: str, what: str) -> str:
    """A non-empty string cell, or an error naming the file, row and column."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
        raise DataError(f"{path}: row {row[ROW]}: {what} column {column!r} is empty; fill it in or "
                        "remove the row")
    return str(value)
