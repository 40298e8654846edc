"""Property-based fuzzing of every loader: any input either loads or raises our DataError."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltatune.data.load import FILE, ROW, load_table
from deltatune.errors import DataError

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]

# (No subnormal floats: training sets torch.set_flush_denormal, which hypothesis detects.)
# Text that looks like the formats (delimiters, quotes, braces, newlines), not only random noise.
format_chars = st.sampled_from(list(',\t"\n\r{}[]:\\ab1 é\x00') + ['"a"', '{"a": 1}', "[1,", "\ufeff"])
text_like = st.lists(format_chars, max_size=60).map("".join)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_subnormal=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=10)


def _load(path, skip):
    rejects = [] if skip else None
    try:
        rows = load_table(path, rejects)
    except DataError as exc:
        assert str(path) in str(exc)  # every message names the file
        return
    for row in rows:
        assert isinstance(row, dict) and isinstance(row[ROW], int) and row[FILE] == str(path)
    for reject in rejects or []:
        assert reject["file"] == str(path) and reject["reason"]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("skip", [False, True])
@SETTINGS
@given(data=st.binary(max_size=200) | text_like.map(lambda t: t.encode("utf-8")))
def test_any_bytes_load_or_raise_our_error(tmp_path, suffix, skip, data):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    _load(path, skip)


@pytest.mark.parametrize("skip", [False, True])
@SETTINGS
@given(records=st.lists(json_values, max_size=6))
def test_any_json_structure_loads_or_raises_our_error(tmp_path, skip, records):
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _load(tmp_path / "a.json", skip)
    _load(tmp_path / "a.jsonl", skip)


@SETTINGS
@given(columns=st.dictionaries(st.text(min_size=1, max_size=5), st.lists(st.text(max_size=6), min_size=0, max_size=4),
                               max_size=3))
def test_any_parquet_table_loads_or_raises_our_error(tmp_path, columns):
    n = min((len(v) for v in columns.values()), default=0)
    table = pa.table({k: v[:n] for k, v in columns.items()}) if columns else pa.table({"x": pa.array([], pa.string())})
    pq.write_table(table, tmp_path / "a.parquet")
    _load(tmp_path / "a.parquet", False)


def test_deep_nesting_is_our_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        load_table(path)


def test_saved_datasets_folder_loads(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    rows = load_table(tmp_path / "ds")
    assert [(r["text"], r[ROW]) for r in rows] == [("a b", 1), ("c d", 2)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="point data.train / data.eval at one split's folder"):
        load_table(tmp_path / "dd")
