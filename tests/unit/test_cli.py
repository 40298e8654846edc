"""The CLI contract on tiny models: train -> run directory -> eval / predict / export."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from deltatune.cli import main
from deltatune.inference import load_run
from deltatune.models import load_model
from tests.helpers import QUICK

CLS_KEYS = {"loss", "accuracy", "macro_f1", "per_class", "confusion_matrix"}


def train_cli(capsys, *args) -> None:
    assert main(["train", *args, *QUICK]) == 0, capsys.readouterr().err
    capsys.readouterr()


def test_classification_run_directory_and_commands(tiny_bert, cls_csv, tmp_path, capsys):
    run = tmp_path / "run"
    train_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", "method.name=lora", "train.epochs=2",
              "train.lr=5e-3", f"output_dir={run}")
    for name in ("config.yaml", "metrics.json", "delta", "tokenizer", "log.jsonl", "data.json", "labels.json"):
        assert (run / name).exists(), name
    assert not (run / "checkpoint").exists()
    assert json.loads((run / "status.json").read_text())["status"] == "completed"
    metrics = json.loads((run / "metrics.json").read_text())
    assert CLS_KEYS <= set(metrics["eval"]) and CLS_KEYS <= set(metrics["baseline"])
    for key in ("trainable_params", "total_params", "train_seconds", "peak_rss_mb"):
        assert metrics[key] > 0, key
    assert set(metrics["eval"]["per_class"]) == {"negative", "positive"}
    assert set(metrics["eval"]["per_class"]["positive"]) == {"precision", "recall", "f1", "support"}
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all({"loss", "lr", "tokens_per_s"} <= set(s) for s in steps if "eval" not in s)
    assert len(json.loads((run / "data.json").read_text())["fingerprint"]) == 64

    assert main(["eval", str(run)]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    assert main(["eval", str(run), "--pretty"]) == 0
    assert "macro_f1" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(cls_csv)]) == 0
    assert CLS_KEYS <= set(json.loads(capsys.readouterr().out)["eval"])

    assert main(["predict", str(run), "--text", "good great film", "--text", "bad dull film"]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in preds] == ["good great film", "bad dull film"]
    for p in preds:
        assert p["label"] in ("negative", "positive")
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\n\nbad film\n")
    assert main(["predict", str(run), "--input", str(texts), "--output", str(tmp_path / "out.jsonl")]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2

    # Our adapter folder is a peft adapter: peft loads it and gives the same outputs.
    loaded = load_run(run)
    ids = loaded.tokenizer(["good great film", "bad film"], padding=True, return_tensors="pt")
    base = load_model(tiny_bert, "sequence", ["negative", "positive"], loaded.tokenizer.pad_token_id)
    peft_model = PeftModel.from_pretrained(base, run / "delta").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**ids).logits, loaded.model(**ids).logits, rtol=0, atol=0)

    # Merge: a plain HF model with the same outputs within 1e-4.
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, loaded.model(**ids).logits, rtol=0, atol=1e-4)


def test_causal_lm_sft_merge_and_generate(tiny_llama, qa_jsonl, tmp_path, capsys):
    run = tmp_path / "lm"
    train_cli(capsys, f"model={tiny_llama}", "task=causal_lm", f"data.train={qa_jsonl}", "method.name=lora",
              "train.epochs=3", "train.lr=1e-2", f"output_dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval"]["perplexity"] < metrics["baseline"]["perplexity"]
    assert metrics["eval"]["perplexity"] == pytest.approx(torch.tensor(metrics["eval"]["loss"]).exp().item(), rel=1e-6)
    assert main(["predict", str(run), "--text", "what is 1 and 2", "--max-new-tokens", "5"]) == 0
    (pred,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert pred["prompt"] == "what is 1 and 2" and 0 < pred["new_tokens"] <= 5

    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    loaded = load_run(run)
    ids = torch.tensor([[4, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded.model(ids).logits, rtol=0, atol=1e-4)


def test_methods_table_and_merge_refusal(tiny_bert, cls_csv, tmp_path, capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"full", "freeze", "feature_extraction", "lora", "qlora", "bitfit", "houlsby", "ia3",
                         "vera", "loha", "lokr", "oft", "adalora", "prefix", "prompt", "ptuning"}
    assert {name for name, r in rows.items() if r["can_merge"]} == {"full", "freeze", "lora", "qlora", "bitfit", "ia3",
                                                                    "vera", "loha", "lokr", "oft", "adalora"}
    assert rows["feature_extraction"]["tasks"] == ["classification"] and not rows["feature_extraction"]["can_merge"]
    assert rows["lora"]["can_merge"] and "causal_lm" in rows["lora"]["tasks"]
    assert main(["methods"]) == 0
    assert "bitfit" in capsys.readouterr().out

    run = tmp_path / "fe"
    train_cli(capsys, f"model={tiny_bert}", f"data.train={cls_csv}", "method.name=feature_extraction",
              f"output_dir={run}")
    assert main(["export", str(run), "--merge"]) == 2
    assert "feature_extraction: the head reads pooled features" in capsys.readouterr().err
    assert not (run / "merged").exists()
    assert main(["export", str(run)]) == 0  # the delta folder itself can always be exported
    assert (run / "export" / "delta.safetensors").is_file()


def test_methods_sizes_on_a_model(tiny_bert, tiny_llama, capsys):
    assert main(["methods", "--model", str(tiny_bert), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert all(r["task"] == "classification" for r in rows.values())
    total = rows["full"]["total_params"]
    assert rows["full"]["trainable_params"] == total and rows["full"]["trainable_percent"] == 100.0
    hidden, layers, labels = 32, 2, 2
    assert rows["lora"]["trainable_params"] == layers * 2 * 8 * (hidden + hidden) + hidden * labels + labels
    assert rows["feature_extraction"]["trainable_params"] == hidden * labels + labels
    head, ffn, virtual = hidden * labels + labels, 2 * hidden, 20  # the tiny BERT's feed-forward is 64 wide
    # IA3 on BERT (peft's defaults): vectors on key and value outputs, and on the inputs of both
    # output.dense layers (attention output: hidden wide; feed-forward output: ffn wide).
    assert rows["ia3"]["trainable_params"] == layers * (hidden + hidden + hidden + ffn) + head
    assert rows["prompt"]["trainable_params"] == virtual * hidden + head  # one embedding per virtual token
    assert rows["prefix"]["trainable_params"] == virtual * layers * 2 * hidden + head  # a key and a value each
    mlp = (hidden * 128 + 128) + (128 * 128 + 128) + (128 * hidden + hidden)  # P-tuning's encoder
    assert rows["ptuning"]["trainable_params"] == virtual * hidden + mlp + head

    assert rows["lora"]["targets"] == ["query", "value"]  # peft's default for BERT, said in the table
    assert "shipped" not in rows["lora"]  # a model folder: no shipped configs

    assert main(["methods", "--model", str(tiny_llama), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lora"]["task"] == "causal_lm"
    assert "no bias terms" in rows["bitfit"]["error"]
    assert rows["feature_extraction"]["error"] == "does not support causal_lm"
    assert main(["methods", "--model", str(tiny_llama)]) == 0
    assert "prefix" in capsys.readouterr().out


def test_methods_on_a_packaged_model_show_its_shipped_configs_too(tiny_bert, tmp_path, monkeypatch, capsys):
    from deltatune import assets, sizes

    monkeypatch.setitem(assets.MODELS, "tiny", ("a tiny BERT", lambda: tiny_bert))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "classification-lora.yaml").write_text(
        "method: {name: lora, r: 8, target_modules: [query, key, value, dense]}\ndata: {train: chatterbot}\n")
    monkeypatch.setattr(sizes, "SHIPPED", tmp_path)
    assert main(["methods", "--model", "tiny", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    hidden, layers, head = 32, 2, 32 * 2 + 2
    shipped = rows["lora"]["shipped"]
    assert shipped["config"] == "configs/tiny/classification-lora.yaml"
    assert shipped["targets"] == ["dense", "key", "query", "value"]
    # per layer q, k, v and the attention output dense (hidden -> hidden), the intermediate dense (hidden -> 64),
    # the output dense (64 -> hidden); and once the pooler's dense (hidden -> hidden): r * (in + out) each
    ffn = 2 * hidden
    per_layer = 8 * (4 * (hidden + hidden) + (hidden + ffn) + (ffn + hidden))
    assert shipped["trainable_params"] == layers * per_layer + 8 * (hidden + hidden) + head
    assert "shipped" not in rows["ia3"]
    assert main(["methods", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "query, value (shipped: dense, key, query, value)" in out


def test_token_classification_run(tiny_bert, tagged_jsonl, tmp_path, capsys):
    run = tmp_path / "tags"
    train_cli(capsys, f"model={tiny_bert}", "task=token_classification", f"data.train={tagged_jsonl}",
              "method.name=lora", "train.epochs=4", "train.lr=1e-2", f"output_dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["eval"]["per_class"]) == {"NEG", "O", "POS"}
    assert metrics["eval"]["accuracy"] > metrics["baseline"]["accuracy"]
    support = sum(c["support"] for c in metrics["eval"]["per_class"].values())
    assert support == 7 * json.loads((run / "data.json").read_text())["eval_rows"]  # each word once; 7 a row
    assert main(["predict", str(run), "--text", "the great film was dull"]) == 0
    (pred,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert pred["tokens"] == ["the", "great", "film", "was", "dull"] and len(pred["tags"]) == 5
    assert set(pred["tags"]) <= {"NEG", "O", "POS"}


def test_seq2seq_run(tiny_t5, qa_jsonl, tmp_path, capsys):
    run = tmp_path / "s2s"
    train_cli(capsys, f"model={tiny_t5}", "task=seq2seq", f"data.train={qa_jsonl}", "method.name=lora",
              "train.epochs=3", "train.lr=1e-2", f"output_dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["eval"]["perplexity"] < metrics["baseline"]["perplexity"]
    assert main(["predict", str(run), "--text", "what is 1 and 2", "--max-new-tokens", "4"]) == 0
    (pred,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert pred["prompt"] == "what is 1 and 2" and 0 < pred["new_tokens"] <= 5
    assert main(["export", str(run), "--merge", "--out", str(tmp_path / "merged")]) == 0
