"""Read a table from CSV, TSV, JSON, JSONL or Parquet into rows that remember where they came from.

Each row is a dict with the file's columns plus ``_row``: the row number as the user would find
it in the file (CSV/TSV: the line number, header = line 1; JSONL: the line number; JSON array
and Parquet: the 1-based record index). Every later error message points at it.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..errors import DataError

ROW = "_row"


def load_table(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file does not exist; check data.train / data.eval in your config")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(readers)}")
    rows = readers[suffix](path)
    if not rows:
        raise DataError(f"{path}: the file has no data rows; a data set needs at least one example")
    return rows


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: bytes that are not UTF-8 ({raw[exc.start:exc.start + 4]!r} "
                        f"at byte {exc.start}); re-save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from exc


def _read_csv(path: Path) -> list[dict]:
    text = _decode(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as exc:
        raise DataError(f"{path}: line 1: malformed header: {exc}") from exc
    header = [h.strip() for h in header]
    rows = []
    try:
        for record in reader:
            if not record or all(not cell.strip() for cell in record):
                continue  # blank lines are not rows
            line = reader.line_num
            if len(record) != len(header):
                raise DataError(f"{path}: line {line}: {len(record)} fields but the header has "
                                f"{len(header)} ({', '.join(header)}); quote fields that contain "
                                f"{'tabs' if delimiter == chr(9) else 'commas'}")
            row = dict(zip(header, record))
            row[ROW] = line
            rows.append(row)
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from exc
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg}); each line must be "
                            "one JSON object") from exc
        rows.append(_record(path, record, f"line {number}", number))
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} style
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects (or JSONL, one object per line)")
    return [_record(path, rec, f"record {i}", i) for i, rec in enumerate(data, start=1)]


def _record(path: Path, record: object, where: str, number: int) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}: expected a JSON object with named fields, got "
                        f"{type(record).__name__}")
    row = dict(record)
    row[ROW] = number
    return row


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
    rows = table.to_pylist()
    for number, row in enumerate(rows, start=1):
        row[ROW] = number
    return rows


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
