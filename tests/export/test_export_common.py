"""What every export holds (model card, manifest with hashes, the run's config and labels), the refusals,
and `deltatune predict` on an export giving the run's own answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.export import MANIFEST, export
from deltatune.export.core import _sha256
from deltatune.inference import load_run, predict
from deltatune.export.load import load_export
from deltatune.train.run import train
from tests.conftest import sentiment_rows, write_csv
from tests.helpers import config
from tests.export.common import cli, probabilities

TEXTS = ["good great film", "the plot was dull and boring", "bad"]


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("export-common")
    data = write_csv(folder / "sentiment.csv", sentiment_rows(32))
    return {m: train(config(tiny_bert, "classification", m, data, folder / m, "train.epochs=1")).path
            for m in ("lora", "houlsby")}


@pytest.mark.parametrize("fmt", ["hf", "delta"])
def test_an_export_holds_card_manifest_config_and_labels_and_predicts_as_the_run(runs, tmp_path, capsys, fmt):
    run, out = runs["lora"], tmp_path / fmt
    code, printed, _ = cli(capsys, "export", run, "--format", fmt, "--out", out)
    assert code == 0 and printed.strip() == str(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == fmt and manifest["task"] == "classification" and manifest["method"] == "lora"
    assert manifest["command"] == f"deltatune export {run} --format {fmt} --out {out}"
    assert set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {MANIFEST}
    assert {"README.md", "config.yaml", "labels.json"} <= set(manifest["files"])
    assert manifest["sha256"] == {f: _sha256(out / f) for f in manifest["files"]}
    card = (out / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    for expected in ("| method | lora |", f"{metrics['trainable_params']:,}", "| metric | before | after |",
                     f"| accuracy | {metrics['baseline']['accuracy']:.4g} | {metrics['eval']['accuracy']:.4g} |",
                     manifest["command"], "fingerprint `"):
        assert expected in card, expected

    want = predict(load_run(run), TEXTS)
    got = predict(load_export(out), TEXTS)
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert probabilities(got) == pytest.approx(probabilities(want), abs=1e-5)
    code, printed, _ = cli(capsys, "predict", out, *[a for t in TEXTS for a in ("--text", t)])
    assert code == 0 and [json.loads(line)["label"] for line in printed.splitlines()] == [w["label"] for w in want]


def test_a_damaged_export_file_is_named_by_predict(runs, tmp_path, capsys):
    out = export(runs["lora"], tmp_path / "merged", fmt="hf")
    weights = next(out.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = cli(capsys, "predict", out, "--text", "good")
    assert code == 2 and f"{weights}: its contents differ from what the export wrote" in err


def test_refusals_name_the_reason_and_the_alternative(runs, tmp_path, capsys):
    lora, houlsby = runs["lora"], runs["houlsby"]
    code, _, err = cli(capsys, "export", houlsby, "--format", "hf", "--out", tmp_path / "h")
    assert code == 2 and "houlsby" in err and "--format delta" in err and not (tmp_path / "h").exists()
    assert cli(capsys, "export", houlsby, "--format", "delta", "--out", tmp_path / "hd")[0] == 0
    code, _, err = cli(capsys, "export", lora, "--format", "tflite", "--out", tmp_path / "x")
    assert code == 2 and "--format tflite: not a format; choose one of hf, delta, gguf, gguf-lora, onnx" in err
    code, _, err = cli(capsys, "export", lora, "--format", "hf", "--quantize", "q8_0", "--out", tmp_path / "x")
    assert code == 2 and "the hf format takes no --quantize" in err
    code, _, err = cli(capsys, "export", lora, "--format", "delta", "--merge", "--out", tmp_path / "x")
    assert code == 2 and "--merge means --format hf" in err
    assert not (tmp_path / "x").exists()


def test_serve_answers_from_an_export_as_the_run(runs, tmp_path):
    """A merged, a delta and an ONNX export served side by side answer as the run (onnxruntime for ONNX)."""
    import asyncio

    from deltatune.serve.engine import Engine

    run = runs["lora"]
    folders = {"run": run, **{fmt: export(run, tmp_path / fmt, fmt=fmt) for fmt in ("hf", "delta", "onnx")}}
    want = predict(load_run(run), TEXTS)

    async def served():
        engine = Engine(folders)
        await engine.start()
        try:
            return {name: await engine.classify(name, TEXTS) for name in folders}
        finally:
            await engine.drain()

    from deltatune.serve.config import run_problems

    assert run_problems({k: str(v) for k, v in folders.items()}) == []  # `deltatune serve --run NAME=EXPORT` takes them
    for name, got in asyncio.run(served()).items():
        assert [g["label"] for g in got] == [w["label"] for w in want], name
        assert probabilities(got) == pytest.approx(probabilities(want), abs=1e-5), name


def test_an_unchecked_export_says_so_in_its_card(runs, tmp_path, capsys):
    code, _, err = cli(capsys, "export", runs["lora"], "--format", "hf", "--no-check", "--out", tmp_path / "u")
    assert code == 0, err
    assert json.loads((tmp_path / "u" / MANIFEST).read_text())["check"] == "skipped (--no-check)"
    card = (tmp_path / "u" / "README.md").read_text()
    assert "## Not checked" in card and "## Checked by the runtime" not in card
