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

import codecs
import csv
import json
from pathlib import Path
from typing import Iterator

from ..assets import DATASETS, resolve_data
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
    a file larger than memory streams; a JSON array is parsed whole (JSONL is the streaming form). A
    packaged data set's name (``chatterbot``) reads its file."""
    path = resolve_data(str(path)) if str(path) in DATASETS else Path(path)
    if path.is_dir():
        yield from _read_datasets_folder(path)
        return
    if not path.is_file():
        raise DataError(f"{path}: file does not exist; give a .csv, .tsv, .json, .jsonl or .parquet file, a "
                        f"`datasets` folder or a packaged data set ({', '.join(DATASETS)})")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".tsv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(readers)}")
    check_format(path, suffix)
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


# ----------------------------------------------------------------------------- is the file what its name says

SNIFF = 64 * 1024  # bytes read from the start of a file to tell text from binary
# (signature at byte 0, what the file is, what to do). Checked before reading, so a file of the wrong
# kind is named for what it is instead of failing later as "not UTF-8" or "no data rows".
SIGNATURES = [
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip -k FILE) and point the config at the result"),
    (b"BZh", "bzip2-compressed", "decompress it first (bunzip2 -k FILE)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it first (unxz -k FILE)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (unzstd FILE)"),
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx workbook is one)",
     "export the sheet as 'CSV UTF-8', or unzip the archive and use the data file inside"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an Office document (an Excel .xls workbook?)",
     "export the sheet as 'CSV UTF-8'"),
    (b"PAR1", "a Parquet file", "give it the .parquet suffix"),
    (b"ARROW1", "an Arrow IPC file", "write it as Parquet (.parquet) or save it with datasets' save_to_disk"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV or JSONL"),
    (b"%PDF-", "a PDF document", "extract the data into a CSV or JSONL file"),
]
BOMS = [(b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
        (b"\xfe\xff", "utf-16-be")]
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\x0b\x0c")


def check_format(path: Path, suffix: str) -> None:
    """Raise a DataError naming what ``path`` really is when it cannot be a ``suffix`` file: binary
    data (NUL bytes, control bytes, not UTF-8), a compressed or Office file, UTF-16, or (for
    .parquet) anything without Parquet's signature. Reads only the first and last bytes."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF)
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - 4))
        tail = fh.read()
    if suffix == ".parquet":
        _check_parquet(path, head, tail)
        return
    if not head:
        return  # empty: the reader says "no data rows"
    kind = f"a {suffix} file must be UTF-8 text"
    known = _signature(head)
    if known:
        signature, what, fix = known
        raise DataError(f"{path}: not a text file but {what} (bytes {signature.hex(' ')} at byte 0); {kind}: {fix}")
    for bom, encoding in BOMS:
        if head.startswith(bom):
            name = encoding[:6].upper()
            raise DataError(f"{path}: {name} text (byte-order mark {bom.hex(' ')} at byte 0), not UTF-8; {kind}: "
                            f"re-save it as UTF-8 (e.g. iconv -f {name} -t UTF-8 FILE > NEW{suffix})")
    nul = head.find(b"\x00")
    odd, even = head[1::2].count(0), head[0::2].count(0)
    if len(head) >= 8 and max(odd, even) * 4 >= len(head) and min(odd, even) * 20 < len(head):
        order = "LE" if odd > even else "BE"  # ASCII as UTF-16: every other byte is 0
        raise DataError(f"{path}: looks like UTF-16 text without a byte-order mark (every other byte is 0, first at "
                        f"byte {nul}), not UTF-8; {kind}: re-save it as UTF-8 (e.g. iconv -f UTF-16{order} -t UTF-8 "
                        f"FILE > NEW{suffix})")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=size <= SNIFF)
        bad = -1
    except UnicodeDecodeError as exc:
        bad = exc.start
    controls = sum(head.count(b) for b in _CONTROL_BYTES)
    first_line = head.split(b"\n", 1)[0]
    if (0 <= nul and (bad >= 0 or b"\x00" in first_line)) or controls * 10 > len(head) \
            or (bad >= 0 and controls * 20 > len(head)):
        found = [f"byte {bad} (0x{head[bad]:02x}) is not UTF-8"] if bad >= 0 else []
        if nul >= 0:
            found.append(f"it has NUL bytes (first at byte {nul})")
        if not found:
            found.append(f"{controls} of its first {len(head)} bytes are control bytes (first at byte "
                         f"{_first_control(head)})")
        raise DataError(f"{path}: not a text file: {', and '.join(found)}; {kind}. It looks like binary data: if "
                        "it is a Parquet file, name it .parquet; if it is compressed, decompress it; if it is a "
                        "spreadsheet, export it as 'CSV UTF-8'")


def _signature(head: bytes) -> tuple[bytes, str, str] | None:
    """The entry of SIGNATURES whose signature ``head`` starts with, if any."""
    for signature, what, fix in SIGNATURES:
        if head.startswith(signature) and (signature != b"BZh" or head[4:10] == b"1AY&SY"):  # bzip2's block magic
            return signature, what, fix
    return None


def _first_control(head: bytes) -> int:
    return min((i for i in (head.find(bytes([b])) for b in _CONTROL_BYTES) if i >= 0), default=-1)


def _check_parquet(path: Path, head: bytes, tail: bytes) -> None:
    if not head:
        raise DataError(f"{path}: an empty file (0 bytes), not a Parquet file; write the data again")
    if head.startswith(b"PAR1"):
        if tail != b"PAR1":
            raise DataError(f"{path}: a damaged or truncated Parquet file: it starts with the Parquet signature "
                            "but does not end with it (no footer); write the file again in full")
        return
    what, fix = "", "write the data as Parquet, or give the file the suffix of its real format"
    known = _signature(head)
    if known:
        what, fix = f"; it is {known[1]}", known[2]
    elif head.find(b"\x00") < 0:
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(head).lstrip("\ufeff \t\r\n")
        except UnicodeDecodeError:
            text = ""
        if text[:1] in ("{", "["):
            what, fix = "; it looks like JSON text", "name it .jsonl (one object per line) or .json"
        elif text:
            first = text.split("\n", 1)[0]
            what = "; it looks like " + ("TSV" if "\t" in first else "CSV") + " text"
            fix = f"name it {'.tsv' if chr(9) in first else '.csv'}"
    raise DataError(f"{path}: not a Parquet file: it does not start with the Parquet signature 'PAR1' "
                    f"(byte 0 is 0x{head[0]:02x}){what}; {fix}")


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
    present = [c for c in rows[0] if c not in (ROW, FILE)]
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
