"""`data prepare --stream`: the same row handling in one pass, with memory independent of file size."""

import json
import random
import tracemalloc

import pyarrow.parquet as pq
import pytest

from deltatune.cli import main
from deltatune.configure import load_config
from deltatune.tasks import prepare_rows
from deltatune.data.stream import prepare_stream
from deltatune.tasks import create
from deltatune.errors import ConfigError


def _big_csv(path, n, seed=0):
    rng = random.Random(seed)
    words = "alpha bravo castle delta engine forest garden harbor island jungle kettle ladder meadow".split()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("text,label\n")
        for i in range(n):
            fh.write(f"{' '.join(rng.choices(words, k=12))} {i},{'ab'[i % 2]}\n")
        fh.write(f"{' '.join(words)} 0,a\n{' '.join(words)} 0,a\n")  # one exact duplicate
        fh.write("broken,row,here\n,b\n")                               # malformed, then an empty text
    return path


def test_stream_counts_and_splits(tmp_path):
    data = _big_csv(tmp_path / "big.csv", 2000)
    cfg = load_config(None, [f"data.train={data}", "data.on_error=skip", "data.test_fraction=0.1"])
    report = prepare_stream(cfg, tmp_path / "out", create(cfg).fields, batch_rows=128)
    assert report["rows_in"] == 2000 + 4
    assert report["rejected_rows"] == 2 and report["exact_duplicates_removed"] == 1
    per = report["rows_per_split"]
    assert sum(per.values()) == 2001
    assert abs(per["eval"] - 400) < 60 and abs(per["test"] - 200) < 45  # hash split: shares in expectation
    rows = {s: pq.read_table(tmp_path / "out" / f"{s}.parquet").to_pylist() for s in per}
    assert {s: len(r) for s, r in rows.items()} == per
    texts = {s: {r["text"] for r in rs} for s, rs in rows.items()}
    assert not (texts["train"] & texts["eval"]) and not (texts["train"] & texts["test"])
    again = prepare_stream(cfg, tmp_path / "out", create(cfg).fields, batch_rows=999)  # same data, other batching: same result
    assert again["fingerprint"] == report["fingerprint"] and again["rows_per_split"] == per
    trained_from = prepare_rows(load_config(None, [f"data.train={tmp_path / 'out'}"]))
    assert len(trained_from.splits["train"]) == per["train"]


def test_stream_memory_does_not_grow_with_the_file(tmp_path):
    data = _big_csv(tmp_path / "big.csv", 6_000)
    cfg = load_config(None, [f"data.train={data}", "data.on_error=skip"])

    def peak(fn):
        tracemalloc.start()
        fn()
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    streamed = peak(lambda: prepare_stream(cfg, tmp_path / "s", create(cfg).fields, batch_rows=500))
    in_memory = peak(lambda: prepare_rows(cfg))
    # the stream keeps a 16-byte digest per row and one batch; the in-memory pipeline every row
    assert streamed < in_memory / 3, (streamed, in_memory)


def test_stream_refuses_what_needs_every_row(tmp_path):
    data = _big_csv(tmp_path / "big.csv", 10)
    cfg = load_config(None, [f"data.train={data}", "data.dedup.near=true", "data.kfold=3"])
    with pytest.raises(ConfigError) as info:
        prepare_stream(cfg, tmp_path / "o", create(cfg).fields)
    assert "data.dedup.near" in str(info.value) and "data.kfold" in str(info.value)
    assert not (tmp_path / "o").exists()


def test_stream_leakage_of_a_separate_eval_file(tmp_path, tiny_bert, capsys):
    train = _big_csv(tmp_path / "train.csv", 300)
    lines = train.read_text().splitlines()
    (tmp_path / "eval.csv").write_text("text,label\n" + "\n".join(lines[1:4]) + "\nsomething new entirely,a\n")
    code = main(["data", "prepare", f"model={tiny_bert}", f"data.train={train}", f"data.eval={tmp_path / 'eval.csv'}",
                 "data.on_error=skip", "data.dedup.leakage=remove", "--stream", "--out", str(tmp_path / "p")])
    assert code == 0
    report = json.loads((tmp_path / "p" / "data_report.json").read_text())
    assert report["leakage_found"]["eval"] == {"exact": 3} and report["rows_per_split"]["eval"] == 1
    assert report["token_lengths"]["train"]["p50"] > 0
