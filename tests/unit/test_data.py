import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.data.examples import IGNORE, encode_sft, prompt_text
from deltatune.data.split import split_rows, take
from deltatune.data.load import load_table
from deltatune.models import load_tokenizer
from tests.conftest import qa_rows, sentiment_rows, write_csv, write_jsonl
from tests.helpers import config


def test_every_format_loads_with_source_row_numbers(tmp_path):
    rows = sentiment_rows(4)
    write_csv(tmp_path / "a.csv", rows)
    (tmp_path / "a.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n\n" for r in rows))
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    assert [r["_row"] for r in load_table(tmp_path / "a.csv")] == [2, 3, 4, 5]  # header is line 1
    assert [r["_row"] for r in load_table(tmp_path / "a.tsv")] == [2, 4, 6, 8]  # blank lines skipped, counted
    for suffix in ("jsonl", "json", "parquet"):
        loaded = load_table(tmp_path / f"a.{suffix}")
        assert [r["_row"] for r in loaded] == [1, 2, 3, 4]
        assert [{k: v for k, v in r.items() if k not in ("_row", "_file")} for r in loaded] == rows


def test_split_is_stratified_seeded_and_disjoint():
    rows = [{"text": str(i), "label": "a" if i % 4 else "b"} for i in range(200)]  # 150 a, 50 b
    train, held = split_rows(rows, 0.2, seed=3, label="label")
    assert Counter(r["label"] for r in held) == {"a": 30, "b": 10}
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in held})
    assert split_rows(rows, 0.2, seed=3, label="label") == (train, held)
    assert split_rows(rows, 0.2, seed=4, label="label")[1] != held
    assert Counter(r["label"] for r in take(train, 40, seed=0, label="label")) == {"a": 30, "b": 10}


def test_sft_masks_the_prompt_and_uses_the_chat_template(tiny_llama, tmp_path):
    tok = load_tokenizer(tiny_llama)
    cfg = config(tiny_llama, "causal_lm", "lora", write_jsonl(tmp_path / "qa.jsonl", qa_rows(4)))
    row = {"prompt": "what is 3 and 4", "response": "3 4 is good"}
    (ex,) = encode_sft([row], tok, cfg)
    head = tok(prompt_text(tok, row["prompt"], True), add_special_tokens=False)["input_ids"]
    assert ex["labels"][: len(head)] == [IGNORE] * len(head)
    answer = tok.decode(ex["labels"][len(head):])
    assert answer.split() == ["3", "4", "is", "good", "<|im_end|>"]  # the turn's end marker is learned too
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|> user what is 3 and 4 <|im_end|>")


def test_sft_truncation_keeps_examples_with_response_tokens(tiny_llama, tmp_path, capsys):
    tok = load_tokenizer(tiny_llama)
    cfg = config(tiny_llama, "causal_lm", "lora", write_jsonl(tmp_path / "qa.jsonl", qa_rows(4)),
                 None, "train.max_length=6")
    examples = encode_sft([{"prompt": "what is 3 and 4 and 5 and 6", "response": "good"}], tok, cfg)
    assert examples == []
    assert "1 example(s) had no response tokens" in capsys.readouterr().err
