"""`--format onnx`: tiny BERT runs as onnxruntime graphs that answer as the run (fp32 within 1e-4, any batch
size and length), int8 with its agreement measured, predict on the export, and the refusals.

A few training steps barely move a random model, so each run's delta is replaced by random values: a
graph that left the delta out would then visibly differ from the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from deltatune.errors import ExportError
from deltatune.export import MANIFEST, export
from deltatune.export import onnx_format
from deltatune.export.eval_inputs import check_inputs
from deltatune.export.load import load_export
from deltatune.inference import load_run, predict, read_run
from deltatune.train.run import train
from tests.conftest import qa_rows, sentiment_rows, tagged_rows, write_csv, write_jsonl
from tests.helpers import config, randomize
from tests.export.common import cli, probabilities

TEXTS = ["good great film", "the plot was dull and boring", "a lovely story", "bad", "the actor was fine and the "
         "story was very good but the plot was quite weak"]
ONE_EPOCH = ["train.epochs=1", "train.lr=1e-3", "train.warmup_ratio=0"]


@pytest.fixture(scope="module")
def runs(tiny_bert, tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-runs")
    cls = write_csv(root / "cls.csv", sentiment_rows(40))
    tags = write_jsonl(root / "tags.jsonl", tagged_rows(40))
    plan = {"cls": (tiny_bert, "classification", "lora", cls),
            "tags": (tiny_bert, "token_classification", "lora", tags),
            "features": (tiny_bert, "classification", "feature_extraction", cls),
            "houlsby": (tiny_bert, "classification", "houlsby", cls),
            "prompt": (tiny_bert, "classification", "prompt", cls),
            "lm": (tiny_llama, "causal_lm", "lora", write_jsonl(root / "qa.jsonl", qa_rows(16)))}
    out = {}
    for seed, (name, (model, task, method, data)) in enumerate(plan.items()):
        out[name] = train(config(model, task, method, data, root / name, *ONE_EPOCH)).path
        randomize(out[name], seed)
    return out


@pytest.mark.parametrize("name", ["cls", "tags"])
def test_fp32_graph_answers_as_the_run_at_any_batch_size_and_length(runs, tmp_path, capsys, name):
    run, out = runs[name], tmp_path / "onnx"
    code, printed, _ = cli(capsys, "export", run, "--format", "onnx", "--out", out)
    assert code == 0 and printed.strip() == str(out)
    manifest = json.loads((out / MANIFEST).read_text())
    check = manifest["check"]
    assert manifest["format"] == "onnx" and manifest["quantize"] == "fp32"
    assert {"model.onnx", "tokenizer.json", "labels.json", "config.yaml"} <= set(manifest["files"])
    assert check["max_abs_probability_difference"] <= 1e-4 and check["argmax_agreement"] == 1.0
    assert "of the run's eval split" in check["inputs"] and check["runtime"].startswith("onnxruntime")
    assert "max abs probability difference" in (out / "README.md").read_text()

    graph, tuned = onnx_format.OnnxModel(out / "model.onnx"), load_run(run)
    assert graph.names == ["input_ids", "attention_mask", "token_type_ids"]
    for texts in (TEXTS[:1], TEXTS):  # batch 1 and 5, of different lengths (padding in the second)
        batch = tuned.tokenizer(texts, padding=True, return_tensors="pt")
        want, got = (onnx_format.real_probabilities(m, batch) for m in (tuned.model, graph))
        assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4

    want, got = predict(tuned, TEXTS), predict(load_export(out), TEXTS)
    if name == "cls":
        assert [g["label"] for g in got] == [w["label"] for w in want]
        assert probabilities(got) == pytest.approx(probabilities(want), abs=1e-4)
        assert len(set(w["label"] for w in want)) == 2  # the random delta makes both labels appear
    else:
        assert got == want


@pytest.mark.parametrize("name, inputs", [("features", ["input_ids", "attention_mask"]),
                                          ("houlsby", ["input_ids", "attention_mask", "token_type_ids"])])
def test_methods_that_cannot_merge_export_their_plain_layers_as_they_are(runs, tmp_path, name, inputs):
    """Feature extraction: encoder, pooling and head in one graph; Houlsby: the adapters inside it."""
    out = export(runs[name], tmp_path / "onnx", fmt="onnx")
    check = json.loads((out / MANIFEST).read_text())["check"]
    assert check["max_abs_probability_difference"] <= 1e-4
    assert onnx_format.OnnxModel(out / "model.onnx").names == inputs
    want, got = predict(load_run(runs[name]), TEXTS), predict(load_export(out), TEXTS)
    assert probabilities(got) == pytest.approx(probabilities(want), abs=1e-4)


def test_int8_records_its_agreement_and_a_miss_leaves_nothing(runs, tmp_path, monkeypatch):
    out = export(runs["cls"], tmp_path / "int8", fmt="onnx", quantize="int8")
    manifest = json.loads((out / MANIFEST).read_text())
    check = manifest["check"]
    assert manifest["quantize"] == "int8" and check["compared"].endswith("texts")
    assert check["argmax_agreement"] >= onnx_format.INT8_AGREEMENT
    assert check["max_abs_probability_difference"] > 0  # int8 weights: not the same numbers
    assert f"argmax agreement: {check['argmax_agreement']:.4g}" in (out / "README.md").read_text()
    graph = onnx.load(out / "model.onnx").graph
    weights = {w.name: list(w.dims) for w in graph.initializer}
    fp32_weights = [weights[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert fp32_weights == [[64, 32]] * 2  # each layer's feed-forward output (outliers) stays fp32
    fp32 = export(runs["cls"], tmp_path / "fp32", fmt="onnx")
    assert (out / "model.onnx").stat().st_size < (fp32 / "model.onnx").stat().st_size

    monkeypatch.setattr(onnx_format, "INT8_AGREEMENT", 1.01)  # a threshold no export meets
    with pytest.raises(ExportError, match=r"int8 onnxruntime picks the run's top class for only 1\.0000 .*"
                                          r"--quantize fp32"):
        export(runs["cls"], tmp_path / "missed", fmt="onnx", quantize="int8")
    assert not (tmp_path / "missed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("int8", "fp32")]


def test_check_falls_back_to_random_ids_when_the_data_is_gone(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["cls"], run)
    parts = read_run(run)
    parts.cfg.data.train = str(tmp_path / "moved.csv")
    ids, source = check_inputs(parts)
    assert len(ids) == 64 and "random token ids: the run's data cannot be read" in source and "moved.csv" in source
    assert "of the run's eval split" in check_inputs(read_run(run))[1]


def test_refusals_name_the_reason_and_the_alternative(runs, tmp_path, capsys):
    code, _, err = cli(capsys, "export", runs["lm"], "--format", "onnx", "--out", tmp_path / "lm")
    assert code == 2 and "task causal_lm does not predict from one forward pass's logits" in err and "hf" in err
    code, _, err = cli(capsys, "export", runs["prompt"], "--format", "onnx", "--out", tmp_path / "prompt")
    assert code == 2 and "method prompt: its delta can neither be merged" in err and "--format delta" in err
    code, _, err = cli(capsys, "export", runs["cls"], "--format", "onnx", "--quantize", "q4_k_m", "--out", tmp_path / "q")
    assert code == 2 and "the onnx format takes one of fp32, int8" in err
    assert not list(tmp_path.iterdir())

