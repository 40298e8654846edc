"""Preference files: pairs and rankings from every table format, and a row-numbered error for
each kind of bad row."""

from __future__ import annotations

import csv
import json
import re

import pytest

from deltatune.data.preferences import Preference, load_preferences, to_pairs
from deltatune.errors import DataError

GOOD_PAIR = {"prompt": "q1", "chosen": "good", "rejected": "bad"}
GOOD_RANKING = {"prompt": "q2", "responses": ["ok", "best", "worst"], "ranking": [1, 0, 2]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_pairs_and_rankings_from_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD_PAIR, GOOD_RANKING])
    assert load_preferences(path) == [Preference("q1", ["good", "bad"], (str(path), 1)),
                                      Preference("q2", ["best", "ok", "worst"], (str(path), 2))]


def test_csv_holds_rankings_as_json_arrays_and_counts_rows_as_lines(tmp_path):
    path = tmp_path / "prefs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "chosen", "rejected", "responses", "ranking"])
        writer.writeheader()
        writer.writerow({**GOOD_PAIR, "responses": "", "ranking": ""})
        writer.writerow({"prompt": "q2", "chosen": "", "rejected": "",
                         "responses": json.dumps(GOOD_RANKING["responses"]), "ranking": "[1, 0, 2]"})
    prefs = load_preferences(path)
    assert [p.responses for p in prefs] == [["good", "bad"], ["best", "ok", "worst"]]
    assert [p.source for p in prefs] == [(str(path), 2), (str(path), 3)]  # the header is line 1


def test_json_array_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    json_path = tmp_path / "prefs.json"
    json_path.write_text(json.dumps([GOOD_RANKING, GOOD_PAIR]))
    assert [p.prompt for p in load_preferences(json_path)] == ["q2", "q1"]
    parquet_path = tmp_path / "prefs.parquet"
    rows = [{**GOOD_PAIR, "responses": None, "ranking": None},
            {"prompt": "q2", "chosen": None, "rejected": None, **{k: GOOD_RANKING[k] for k in ("responses", "ranking")}}]
    pq.write_table(pa.Table.from_pylist(rows), parquet_path)
    prefs = load_preferences(parquet_path)
    assert [p.responses for p in prefs] == [["good", "bad"], ["best", "ok", "worst"]]
    assert prefs[1].source == (str(parquet_path), 2)


def test_to_pairs_gives_every_pair_a_ranking_implies_in_order():
    prefs = [Preference("q", ["a", "b", "c"], ("f", 1)), Preference("r", ["x", "y"], ("f", 2))]
    assert to_pairs(prefs) == [("q", "a", "b"), ("q", "a", "c"), ("q", "b", "c"), ("r", "x", "y")]


BAD_ROWS = [
    ({"chosen": "a", "rejected": "b"}, "no 'prompt' field"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": "a"}, "no 'rejected' field"),
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "'chosen' and 'rejected' are the same text"),
    ({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' must be text, got int 7"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},
     "'chosen' must be text, got a list (conversations as message lists are not supported"),
    ({"prompt": "q", "text": "a"}, "needs 'chosen' and 'rejected' (a pair) or 'responses' and 'ranking'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "responses": ["a", "b"], "ranking": [0, 1]},
     "fills in both 'chosen'/'rejected' and 'responses'/'ranking'"),
    ({"prompt": "q", "responses": ["a", "b"]}, "no 'ranking' field"),
    ({"prompt": "q", "responses": ["only"], "ranking": [0]}, "'responses' has 1; a preference needs at least 2"),
    ({"prompt": "q", "responses": [], "ranking": []}, "'responses' is empty"),
    ({"prompt": "q", "responses": "a, b", "ranking": [0, 1]}, "'responses' must be a list like"),
    ({"prompt": "q", "responses": ["a", 3], "ranking": [0, 1]}, "responses[1] must be text, got int 3"),
    ({"prompt": "q", "responses": ["a", ""], "ranking": [0, 1]}, "responses[1] is empty"),
    ({"prompt": "q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]},
     "responses[0] and responses[2] are the same text"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}, "'ranking' [0, 0, 1] is not a permutation of 0..2"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 1, 3]}, "'ranking' [0, 1, 3] is not a permutation"),
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [1, 0]}, "'ranking' [1, 0] is not a permutation"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": ["1", "0"]}, "'ranking' must hold whole-number indices"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [1.0, 0.0]}, "'ranking' must hold whole-number indices"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [True, False]}, "'ranking' must hold whole-number indices"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": {"best": 0}}, "'ranking' must be a list like"),
]


@pytest.mark.parametrize("record, reason", BAD_ROWS, ids=[reason[:40] for _, reason in BAD_ROWS])
def test_each_bad_row_is_named_by_file_and_row(tmp_path, record, reason):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD_PAIR, GOOD_RANKING, record])
    with pytest.raises(DataError, match=re.escape(f"{path}: row 3: {reason}")) as caught:
        load_preferences(path)
    assert "data.on_error=skip" in str(caught.value)


def test_bad_csv_cell_says_how_to_write_a_list(tmp_path):
    path = tmp_path / "prefs.csv"
    path.write_text('prompt,responses,ranking\nq,"a; b","[0, 1]"\n')
    with pytest.raises(DataError, match=re.escape(f"{path}: row 2: 'responses' is not a JSON array; in a CSV "
                                                  'cell write it as ["first answer", "second answer"]')):
        load_preferences(path)


def test_skip_collects_rejects_and_keeps_the_good_rows(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([json.dumps(GOOD_PAIR), "{not json", json.dumps({**GOOD_PAIR, "chosen": "bad"}),
                               json.dumps(GOOD_RANKING)]) + "\n")
    rejects: list[dict] = []
    prefs = load_preferences(path, on_error="skip", rejects=rejects)
    assert [p.source[1] for p in prefs] == [1, 4]
    assert [(r["file"], r["row"]) for r in rejects] == [(str(path), 2), (str(path), 3)]
    assert "not valid JSON" in rejects[0]["reason"] and "same text" in rejects[1]["reason"]


def test_skip_without_a_rejects_list_says_rows_were_skipped(tmp_path, capsys):
    path = write_jsonl(tmp_path / "prefs.jsonl", [GOOD_PAIR, {**GOOD_PAIR, "rejected": ""}])
    assert len(load_preferences(path, on_error="skip")) == 1
    assert "skipped 1 bad preference row(s)" in capsys.readouterr().err


def test_a_file_with_only_bad_rows_fails_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{**GOOD_PAIR, "rejected": "good"}])
    with pytest.raises(DataError, match=re.escape(f"{path}: no usable preference rows; all 1 were rejected "
                                                  "(first: row 1: 'chosen' and 'rejected' are the same text")):
        load_preferences(path, on_error="skip", rejects=[])


def test_missing_file_and_bad_on_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="use 'fail' or 'skip'"):
        load_preferences(tmp_path / "nope.jsonl", on_error="ignore")
