"""GGUF exports checked by llama.cpp itself: a tiny Llama with SmolLM2's byte-level BPE tokenizer (a real
one: llama.cpp tokenizes with it) and a LoRA run on it whose greedy answers are decided (trained until it
ends its answers, on every linear layer, so K's permutation under grouped-query attention is exercised).

On this run every check passes with room (f16's largest logit difference 0.003 against the run's smallest
top-2 lead of 0.06), so the exact figures are asserted; q4_k_m's threshold on the real SmolLM2 is
tests/e2e/test_real_models.py's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from deltatune.cli import main
from deltatune.data.examples import prompt_ids
from deltatune.export import MANIFEST, gguf, gguf_file, llamacpp
from deltatune.export.load import load_export
from deltatune.inference import load_run, predict, read_run
from deltatune.train.run import train
from tests.conftest import qa_rows, sentiment_rows, write_csv, write_jsonl
from tests.helpers import config

PROMPTS = ["what is 1 and 2", "what is 7 and 3", "hello", "what is 4 and 9 and 1"]
LORA_EVERYWHERE = ["method.r=16", "method.alpha=32", "method.dropout=0",
                   "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both runtimes on one thread: faster on models this small, and llama.cpp's threads spin-wait, so a
    busy second core would slow them twentyfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_bpe_llama(path: Path) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads over 2 key/value heads) with SmolLM2's tokenizer. Its padding
    token is <|endoftext|>, not the end-of-turn token: padding is masked out of the loss, and the run must
    learn to end its answers."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    tok.pad_token = "<|endoftext|>"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=0.1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-runs")
    base = make_bpe_llama(root / "bpe-llama")
    qa = write_jsonl(root / "qa.jsonl", qa_rows(64))
    cls = write_csv(root / "cls.csv", sentiment_rows(16))
    quick = ["train.max_steps=1"]
    plan = {"lora": (base, "causal_lm", "lora", qa, ["train.epochs=10", "train.lr=1e-2", "train.warmup_ratio=0",
                                                       *LORA_EVERYWHERE]),
            "prompt": (base, "causal_lm", "prompt", qa, quick), "bert": (tiny_bert, "classification", "lora", cls, quick)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTATUNE_REGISTRY", str(root / "registry.sqlite"))
        return {name: train(config(model, task, method, data, root / name, *extra)).path
                for name, (model, task, method, data, extra) in plan.items()}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """The base GGUF that gguf-lora builds goes to a cache of the tests' own (the packaged SmolLM2, converted
    once, stays in the user's)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "cache_dir", lambda: cache)
        yield


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, Path]:
    """Each format exported once (with its check) through the command line."""
    root, out = tmp_path_factory.mktemp("gguf-exports"), {}
    for name, args in {"f32": ["--quantize", "f32"], "f16": [], "q8_0": ["--quantize", "q8_0"],
                       "q4_k_m": ["--quantize", "q4_k_m"], "lora": ["--format", "gguf-lora"]}.items():
        fmt = [] if "--format" in args else ["--format", "gguf"]
        assert main(["export", str(runs["lora"]), *fmt, *args, "--out", str(root / name)]) == 0, name
        out[name] = root / name
    return out


def check_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())["check"]


def metadata(file: Path) -> dict:
    reader = GGUFReader(file)
    return {key: field.contents() for key, field in reader.fields.items()
            if key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")}


@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_f32_and_f16_give_the_runs_greedy_tokens_and_logits(runs, exports, quant):
    check = check_of(exports[quant])
    assert check["tokenization_equal"] == "20/20" and check["greedy_equal"] == "20/20"
    assert check["max_logit_diff"] <= gguf.LOGIT_TOLERANCE[quant] and check["max_logit_diff_allowed"]
    assert check["top1_agreement"] == 1.0
    assert "greedy equal: 20/20" in (exports[quant] / "README.md").read_text()
    meta = metadata(exports[quant] / f"model-{quant}.gguf")
    tok = read_run(runs["lora"]).tokenizer
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.chat_template"] == tok.chat_template


def test_predict_on_a_gguf_export_gives_the_runs_answers(runs, exports, capsys):
    want = predict(load_run(runs["lora"]), PROMPTS, max_new_tokens=16)
    assert len({w["response"] for w in want}) > 1  # the prompts are answered differently
    for name in ("f32", "lora"):
        got = predict(load_export(exports[name]), PROMPTS, max_new_tokens=16)
        assert got == want, name
    assert main(["predict", str(exports["f16"]), "--text", PROMPTS[0]]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["response"] == predict(
        load_run(runs["lora"]), PROMPTS[:1])[0]["response"]


def test_serve_refuses_a_gguf_export_and_names_what_serves_it(exports):
    from deltatune.errors import DeltatuneError
    from deltatune.serve.loading import read_parts

    with pytest.raises(DeltatuneError, match="runs in llama.cpp, which deltatune serve does not drive.*llama-server"):
        read_parts(exports["f16"])


@pytest.mark.parametrize("quant, ftype", [("q8_0", 7), ("q4_k_m", 15)])
def test_quantized_files_are_llama_cpps_and_record_their_agreement(exports, quant, ftype):
    file = exports[quant] / f"model-{quant}.gguf"
    assert metadata(file)["general.file_type"] == ftype
    assert file.stat().st_size < (exports["f32"] / "model-f32.gguf").stat().st_size / 2  # its tokenizer (1.5 MB) is not quantized
    check = check_of(exports[quant])
    assert check["top1_agreement_decided_min"] == gguf.AGREEMENT[quant]
    assert check["top1_agreement_decided"] >= gguf.AGREEMENT[quant]
    assert 0 < check["positions"] and 0 <= check["near_ties"] < check["positions"]
    assert {"top1_agreement", "max_logit_diff", "greedy_equal"} <= set(check)


def test_gguf_lora_on_the_base_gives_the_merged_ggufs_greedy_tokens(runs, exports):
    parts = read_run(runs["lora"])
    adapter, merged = exports["lora"] / "adapter.gguf", exports["f32"] / "model-f32.gguf"
    base = gguf.base_gguf_path(parts)
    assert base.is_file() and str(base) in (exports["lora"] / "README.md").read_text()
    meta = metadata(adapter)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 32
    names = {t.name for t in GGUFReader(adapter).tensors}
    assert {"blk.0.attn_k.weight.lora_a", "blk.0.attn_k.weight.lora_b", "blk.1.ffn_down.weight.lora_b"} <= names
    assert adapter.stat().st_size < merged.stat().st_size / 10
    check = check_of(exports["lora"])
    assert check["greedy_equal"] == "20/20" and check["max_logit_diff"] <= gguf.LOGIT_TOLERANCE["f32"]

    prompts, _ = gguf.check_prompts(parts)
    with_lora, alone = llamacpp.open_model(base, lora=adapter), llamacpp.open_model(merged)
    try:
        ids = [prompt_ids(parts.tokenizer, p, True) for p in prompts]
        assert [llamacpp.greedy(with_lora, i, 24, 2) for i in ids] == [llamacpp.greedy(alone, i, 24, 2) for i in ids]
    finally:
        with_lora.close()
        alone.close()


def test_greedy_may_part_from_the_run_only_where_the_run_hardly_preferred_its_token():
    scores = np.zeros((3, 5), dtype=np.float32)
    scores[1, 3], scores[1, 4] = 2.0, 1.9  # at the second token the run led token 4 by 0.1 logits
    assert gguf.lead_lost([7, 4, 0], [7, 3, 1], scores) == pytest.approx(0.1)
    assert gguf.lead_lost([7, 3], [7, 3, 1], scores) == float("inf")


def test_a_failed_check_names_its_figures_and_leaves_no_folder(runs, tmp_path, capsys, monkeypatch):
    """Without llama.cpp's Q/K row permutation the file loads but attends wrongly: the check must catch it."""
    monkeypatch.setattr(gguf_file, "permute", lambda weight, n_head: weight)
    out = tmp_path / "broken"
    assert main(["export", str(runs["lora"]), "--format", "gguf", "--quantize", "f32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model-f32.gguf in llama.cpp does not give the run's answers" in err and "max_logit_diff" in err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.iterdir())


def test_refusals_name_the_reason_and_the_alternative(runs, tmp_path, capsys):
    cases = [(runs["bert"], "gguf", "GGUF holds decoder language models"),
             (runs["bert"], "gguf-lora", "GGUF holds decoder language models"),
             (runs["prompt"], "gguf", "prompt cannot be merged into the base weights"),
             (runs["prompt"], "gguf-lora", "this run's delta (prompt) is not one")]
    for run, fmt, reason in cases:
        assert main(["export", str(run), "--format", fmt, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert reason in err and "--format" in err.split(reason)[1], err
    assert main(["export", str(runs["prompt"]), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "--format delta" in capsys.readouterr().err
    assert main(["export", str(runs["lora"]), "--format", "gguf-lora", "--quantize", "q8_0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "the gguf-lora format takes no --quantize" in capsys.readouterr().err
    assert main(["export", str(runs["lora"]), "--format", "gguf", "--quantize", "q5_0",
                 "--out", str(tmp_path / "x")]) == 2
    assert "takes one of f16, f32, q8_0, q4_k_m" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_tokenizer_llama_cpp_cannot_split_alike_is_refused(tiny_llama):
    """The conftest Llama's word-level tokenizer has no GGUF BPE form."""
    from transformers import AutoConfig, AutoTokenizer

    problem = gguf_file.llama_problem(AutoConfig.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama))
    assert "not a byte-level BPE" in problem and "--format hf" in problem
