"""Each kind of bad input: one clear message naming where and what to do, exit 2, nothing left behind."""

import json

import pytest

from deltatune.cli import main
from deltatune.train.run import train
from tests.conftest import sentiment_rows, write_csv
from tests.helpers import QUICK, config


def run_cli(capsys, *args):
    code = main(["train", *args, *QUICK])
    return code, capsys.readouterr().err


def check_failed_cleanly(code, err, out_dir, *needles):
    assert code == 2
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not out_dir.exists(), "a rejected run must not leave a run directory"


def test_missing_file(tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={tmp_path}/nope.csv", f"output_dir={out}")
    check_failed_cleanly(code, err, out, "data.train", "nope.csv does not exist")


def test_missing_column(tiny_bert, cls_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", "data.label_column=sentiment",
                        f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(cls_csv), "no column 'sentiment'", "data.label_column",
                         "the file has: text, label")


def test_empty_data_set(tiny_bert, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={empty}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(empty), "no data rows")


def test_single_class(tiny_bert, tmp_path, capsys):
    data = write_csv(tmp_path / "one.csv", [r for r in sentiment_rows(40) if r["label"] == "positive"])
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "single class ('positive')", "at least two classes")


def test_missing_label(tiny_bert, tmp_path, capsys):
    rows = sentiment_rows(20)
    rows[3]["label"] = ""  # file line 5 (header is line 1)
    data = write_csv(tmp_path / "gaps.csv", rows)
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "row 5", "label column 'label' is empty")


def test_bytes_that_are_not_utf8(tiny_bert, tmp_path, capsys):
    data = tmp_path / "latin1.csv"
    data.write_bytes(b"text,label\ngood film,positive\nbad film,negative\ncaf\xe9 film,positive\n")
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={data}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "line 4", "not UTF-8", "re-save the file as UTF-8")


def test_eval_label_unknown_to_training(tiny_bert, cls_csv, tmp_path, capsys):
    bad = write_csv(tmp_path / "eval.csv", [{"text": "good film", "label": "positive"},
                                            {"text": "meh film", "label": "neutral"}])
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", f"data.eval={bad}", f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(bad), "row 3", "label 'neutral'")


@pytest.mark.parametrize("override,needles", [
    ("method.name=lorra", ["method.name: unknown method 'lorra' (did you mean 'lora'?)", "available:"]),
    ("model=minilmm", ["model: unknown model 'minilmm' (did you mean 'minilm'?)"]),
    ("train.lrr=0.1", ["train.lrr: unknown key (did you mean 'lr'?)"]),
])
def test_unknown_method_model_or_key(tiny_bert, cls_csv, tmp_path, capsys, override, needles):
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", override, f"output_dir={out}")
    check_failed_cleanly(code, err, out, *needles)


def test_existing_output_is_never_overwritten(tiny_bert, cls_csv, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", f"output_dir={out}")
    assert code == 2 and "exists and is not empty" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_run_that_fails_midway_is_marked_failed(tiny_bert, cls_csv, tmp_path, capsys):
    def explode(state):
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run"), callbacks=(explode,))
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "disk on fire" in status["error"]
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "delta").exists()
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert "run is failed, not completed" in capsys.readouterr().err


def test_tags_that_do_not_match_the_words(tiny_bert, tmp_path, capsys):
    data = tmp_path / "tags.jsonl"
    data.write_text('{"tokens": ["good", "film"], "tags": ["POS", "O"]}\n'
                    '{"tokens": ["bad", "film"], "tags": ["NEG"]}\n')
    out = tmp_path / "run"
    code, err = run_cli(capsys, f"model={tiny_bert}", "task=token_classification", f"data.train={data}",
                        f"output_dir={out}")
    check_failed_cleanly(code, err, out, str(data), "row 2", "2 words but 1 tags")
