"""More bad input, each caught before the run directory: non-finite or absurd numbers, YAML keys given
twice, an empty output_dir, control characters in labels, text columns that hold no text, layer names
that match nothing, and data files that are not what their suffix says."""

import gzip
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deltatune.cli import main
from deltatune.configure import load_config
from deltatune.tasks import prepare_rows
from tests.conftest import sentiment_rows, write_csv, write_jsonl
from tests.unit.test_bad_input import check_failed_cleanly, run_cli


def _yaml(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- 1. numbers

def test_nan_learning_rate_in_yaml(tiny_bert, cls_csv, tmp_path, capsys):
    path = _yaml(tmp_path, "train:\n  lr: .nan\n  epochs: 1\n")
    out = tmp_path / "run"
    code, err = run_cli(capsys, str(path), f"model={tiny_bert}", f"data.train={cls_csv}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(path), "train.lr: expected a finite number, got nan")


@pytest.mark.parametrize("override,needle", [
    ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("train.lr=1e999", "train.lr: expected a finite number, got '1e999'"),
    ("train.warmup_ratio=-.inf", "train.warmup_ratio: expected a finite number"),
    ("method.alpha=nan", "method.alpha: expected a finite number"),          # a method's own option
    ("data.dedup.threshold=.nan", "data.dedup.threshold: expected a finite number"),  # a nested section
    ("train.lr=1e30", "train.lr: 1e+30 is far too large"),
    ("train.lr=0", "train.lr: must be greater than 0, got 0.0"),
])
def test_non_finite_and_absurd_numbers(tiny_bert, cls_csv, tmp_path, capsys, override, needle):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", override, f"output_dir={out}")
    check_failed_cleanly(code, err, out, needle)


def test_a_large_learning_rate_warns_except_for_soft_prompts(tiny_bert, cls_csv, capsys):
    base = [f"model={tiny_bert}", f"data.train={cls_csv}", "train.lr=2"]
    assert main(["validate", *base, "method.name=lora"]) == 0
    assert "warning: train.lr: 2 is unusually large for lora" in capsys.readouterr().err
    assert main(["validate", *base, "method.name=prompt"]) == 0  # prompt tuning trains at rates near 1
    assert "warning" not in capsys.readouterr().err
    assert main(["validate", f"model={tiny_bert}", f"data.train={cls_csv}", "train.lr=0.3"]) == 0
    assert "warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2. YAML keys given twice

def test_yaml_key_given_twice(tiny_bert, cls_csv, tmp_path, capsys):
    path = _yaml(tmp_path, f"model: {tiny_bert}\ntrain:\n  lr: 1.0e-3\n  epochs: 1\n  lr: 2.0e-3\n"
                           f"data:\n  train: {cls_csv}\n  clean:\n    min_chars: 1\n    min_chars: 2\n")
    out = tmp_path / "run"
    code, err = run_cli(capsys, str(path), f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(path), "2 problem(s)", "train.lr: given twice (lines 3 and 5)",
                         "data.clean.min_chars: given twice (lines 9 and 10)")


def test_yaml_merge_keys_may_still_be_overridden(tiny_bert, cls_csv, tmp_path):
    from deltatune.config import load_yaml

    path = _yaml(tmp_path, f"model: {tiny_bert}\ndata: {{train: {cls_csv}}}\n"
                           "train:\n  <<: {lr: 1.0e-3, epochs: 3}\n  lr: 2.0e-3\n")
    cfg = load_config(path)  # an explicit key next to a merge overrides the merged one: not a duplicate
    assert (cfg.train.lr, cfg.train.epochs) == (2e-3, 3)
    anchors = "base: &base {lr: 1, epochs: 2}\na:\n  <<: *base\n  lr: 3\nb:\n  <<: *base\n"
    assert load_yaml(anchors, "x") == {"base": {"lr": 1, "epochs": 2}, "a": {"lr": 3, "epochs": 2},
                                       "b": {"lr": 1, "epochs": 2}}


def test_key_given_twice_inside_an_override_value(tiny_bert, cls_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}",
                        "data.clean.label_map={pos: positive, pos: negative}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, "data.clean.label_map.pos: given twice")


# ----------------------------------------------------------------------------- 3. empty output_dir

@pytest.mark.parametrize("how", ["override", "yaml"])
def test_empty_output_dir(tiny_bert, cls_csv, tmp_path, capsys, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    args = ["output_dir="] if how == "override" else [str(_yaml(tmp_path, "output_dir: ''\n"))]
    code, err = run_cli(capsys, *args, f"model={tiny_bert}", f"data.train={cls_csv}")
    check_failed_cleanly(code, err, tmp_path / "runs", "output_dir: empty", "leave output_dir out")


# ----------------------------------------------------------------------------- 4. control characters

def _nul_label_csv(tmp_path):
    rows = sentiment_rows(40)
    rows[2]["label"] = "positive\x00"  # file line 4 (header is line 1)
    rows[5]["text"] = "good\x07 film and\tfine"
    return write_csv(tmp_path / "nul.csv", rows)


def test_control_character_in_a_label(tiny_bert, tmp_path, capsys):
    data = _nul_label_csv(tmp_path)
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, f"{data}: row 4: label column 'label'", r"'positive\x00'", "U+0000",
                         "data.control_chars=strip")


def test_control_characters_stripped_or_skipped(tiny_bert, tmp_path):
    data = _nul_label_csv(tmp_path)
    stripped = prepare_rows(load_config(None, [f"model={tiny_bert}", f"data.train={data}",
                                               "data.control_chars=strip"]))
    assert stripped.report["control_chars_stripped"] == 2 and stripped.report["rejected_rows"] == 0
    assert set(stripped.report["label_counts"]["train"]) == {"positive", "negative"}
    texts = {r["text"] for s in stripped.splits.values() for r in s}
    assert "good film and fine" in texts  # \x07 removed; the tab is whitespace, normalised
    skipped = prepare_rows(load_config(None, [f"model={tiny_bert}", f"data.train={data}", "data.on_error=skip"]))
    assert [(r["row"], "U+0000" in r["reason"]) for r in skipped.rejects] == [(4, True)]
    assert skipped.report["control_chars_stripped"] == 0  # text columns are kept as they are by default
    assert any("\x07" in r["text"] for s in skipped.splits.values() for r in s)


def test_the_option_is_documented(capsys):
    assert main(["validate", "--explain"]) == 0
    assert "data.control_chars = 'reject'" in capsys.readouterr().out


def test_control_character_in_a_tag(tiny_bert, tmp_path, capsys):
    rows = [{"tokens": ["good", "film"], "tags": ["POS", "O"]}, {"tokens": ["bad", "film"], "tags": ["NEG\x1b", "O"]}]
    data = write_jsonl(tmp_path / "tags.jsonl", rows * 5)
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", "task=token_classification", f"data.train={data}",
                        f"output_dir={out}")
    check_failed_cleanly(code, err, out, f"{data}: row 2: tags column 'tags'", r"'NEG\x1b'", "a tag of its own")


# ----------------------------------------------------------------------------- 5. column types

def _parquet(tmp_path, name, rows):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_list_column_as_text(tiny_bert, tmp_path, capsys):
    data = _parquet(tmp_path, "words.parquet", [{"text": r["text"].split(), "label": r["label"]}
                                                for r in sentiment_rows(20)])
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "text column 'text' (data.text_column) must hold text",
                         "a list", "row 1 (", "row 5 (", "and possibly more", "' '.join(words)")


def test_parquet_integer_column_as_text(tiny_bert, tmp_path, capsys):
    data = _parquet(tmp_path, "ints.parquet", [{"text": i, "label": r["label"]}
                                               for i, r in enumerate(sentiment_rows(20))])
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "text column 'text'", "a number (int)", "row 1 (0)", "row 2 (1)")


def test_jsonl_numbers_where_text_is_expected(tiny_bert, tmp_path, capsys):
    rows = sentiment_rows(20)
    rows[3]["text"], rows[9]["text"] = 42, 7.5
    data = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "row 4 (42), row 10 (7.5)", "a number (float) or a number (int)")
    assert "possibly more" not in err
    skipped = prepare_rows(load_config(None, [f"model={tiny_bert}", f"data.train={data}", "data.on_error=skip"]))
    assert [(r["row"], r["reason"]) for r in skipped.rejects] == [
        (4, "text column 'text' holds a number (int), not text"), (10, "text column 'text' holds a number (float), not text")]


def test_integer_labels_are_class_ids(tiny_bert, tmp_path):
    data = _parquet(tmp_path, "ids.parquet", [{"text": r["text"], "label": int(r["label"] == "positive")}
                                              for r in sentiment_rows(20)])
    prepared = prepare_rows(load_config(None, [f"model={tiny_bert}", f"data.train={data}"]))
    assert set(prepared.report["label_counts"]["train"]) == {"0", "1"}


# ----------------------------------------------------------------------------- 6. layer names

@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_target_modules_that_match_nothing(tiny_bert, cls_csv, tmp_path, capsys, method):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", f"method.name={method}",
                        "method.target_modules=[query,nonexistent]", f"output_dir={out}")
    check_failed_cleanly(code, err, out, "method.target_modules: 'nonexistent' matched no layer",
                         "available linear layers: dense, key, query, value")
    assert "NoMatchingPeftModuleError" not in err


def test_target_modules_naming_a_block_or_the_head(tiny_bert, cls_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}",
                        "method.target_modules=[attention,classifier]", f"output_dir={out}")
    check_failed_cleanly(code, err, out, "'attention' is a BertAttention, not a layer this method can adapt",
                         "'classifier' is the task's new head")


def test_dotted_target_module_names_still_match(tiny_bert, cls_csv):
    from deltatune.methods import registry
    from deltatune.models import load_model
    from deltatune.tasks import create

    cfg = load_config(None, [f"model={tiny_bert}", f"data.train={cls_csv}",
                             "method.target_modules=[attention.self.query,dense]"])
    task = create(cfg)
    model = registry.get("lora").apply(load_model(tiny_bert, "sequence", ["neg", "pos"], 0), cfg.method.options, task)
    adapted = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert adapted == {"query", "dense"}


# ----------------------------------------------------------------------------- 7. files that are not text

@pytest.mark.parametrize("name,content,needles", [
    ("random.csv", random.Random(0).randbytes(3000), ["not a text file", "byte 0 (0x", "is not UTF-8",
                                                       "NUL bytes (first at byte", "name it .parquet"]),
    ("zeros.csv", bytes(500), ["not a text file", "NUL bytes (first at byte 0)"]),
    ("packed.csv", gzip.compress(b"text,label\ngood film,positive\n" * 20, mtime=0), ["gzip-compressed", "bytes 1f 8b at byte 0",
                                                                             "gunzip"]),
    ("packed.jsonl", gzip.compress(b'{"text": "a", "label": "b"}\n' * 20, mtime=0), ["gzip-compressed", "a .jsonl file"]),
    ("binary.jsonl", random.Random(1).randbytes(3000), ["not a text file", "a .jsonl file must be UTF-8 text"]),
    ("wide.csv", "text,label\ngood film,positive\n".encode("utf-16"), ["UTF-16 text", "iconv -f UTF-16"]),
    ("text.parquet", b"text,label\ngood film,positive\nbad film,negative\n",
     ["not a Parquet file", "'PAR1'", "byte 0 is 0x74", "looks like CSV text; name it .csv"]),
    ("rows.parquet", b'{"text": "good film", "label": "positive"}\n', ["not a Parquet file", "looks like JSON"]),
], ids=lambda v: v if isinstance(v, str) and "." in v else "")
def test_files_that_are_not_what_their_suffix_says(tiny_bert, tmp_path, capsys, name, content, needles):
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), *needles)
    assert "no data rows" not in err


def test_truncated_parquet(tiny_bert, tmp_path, capsys):
    whole = _parquet(tmp_path, "whole.parquet", sentiment_rows(20))
    data = tmp_path / "cut.parquet"
    data.write_bytes(whole.read_bytes()[:-10])
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "damaged or truncated Parquet file")


def test_a_stray_nul_in_a_text_cell_is_not_a_binary_file(tiny_bert, tmp_path):
    rows = sentiment_rows(40)
    rows[7]["text"] = "good\x00 film"
    data = write_csv(tmp_path / "one-nul.csv", rows)
    prepared = prepare_rows(load_config(None, [f"model={tiny_bert}", f"data.train={data}"]))
    assert prepared.report["rows_in"] == 40
    assert json.dumps(prepared.report)  # the report stays plain JSON
