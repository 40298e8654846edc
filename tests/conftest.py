"""Shared fixtures: tiny random models with a small word-level tokenizer, and data files."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest

pytest_plugins = ("tests.studio_browser",)  # the studio's browser tests' fixtures: browser, page, check

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.bf16=auto measures this machine's bf16 products (deltatune/train/precision.py); the suite's numeric
# checks against fp32 references run in fp32 on every machine. Tests of the bf16 paths set train.bf16=true.
os.environ.setdefault("DELTATUNE_AUTO_BF16", "0")

POSITIVE = "good great excellent wonderful superb lovely fine brilliant".split()
NEGATIVE = "bad awful terrible poor dreadful boring dull weak".split()
FILLER = "the movie film plot actor scene story was is and very quite a an this that".split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def _no_flush_denormal_after_training():
    """Training sets torch.set_flush_denormal(True) for the process (faster CPU steps); hypothesis (and
    schemathesis on top of it) then refuses to generate floats. Each test starts from the default."""
    yield
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_flush_denormal(False)


@pytest.fixture(autouse=True)
def _private_run_registry(tmp_path_factory, monkeypatch):
    """Every test records its runs in its own registry file, never in the user's."""
    monkeypatch.setenv("DELTATUNE_REGISTRY", str(tmp_path_factory.mktemp("registry") / "registry.sqlite"))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): the
    tiny models' matrices are a few dozen wide, and on shared cores thread hand-offs cost more than the
    arithmetic (measured with PPO: one iteration 0.7 s on 1 thread vs 5 s on 2 under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer(chat: bool, append_eos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(POSITIVE + NEGATIVE + FILLER + "what is your name my q a hello hi yes no".split()))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + words + [str(i) for i in range(20)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    if append_eos:  # T5-style: every sequence ends with </s>
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat:
        fast.chat_template = CHATML
    return fast


def make_tiny_bert(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    tok = _tokenizer(chat=False)
    torch.manual_seed(0)
    # initializer_range 0.2 (not 0.02): with near-zero weights every position of a 2-layer random
    # BERT looks alike, and a head reading a soft-prompt position would get no signal to learn from.
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                     initializer_range=0.2)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, hidden: int = 32) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(chat=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_t5(path: Path) -> Path:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _tokenizer(chat=False, append_eos=True)
    torch.manual_seed(0)
    # d_model 64: bitsandbytes' CPU 4-bit kernels (QLoRA) need input widths in blocks of 64.
    cfg = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"what is {a} and {b}", "response": f"{a} {b} is {'good' if (a + b) % 2 else 'bad'}"}
            for a, b in ((rng.randrange(10), rng.randrange(10)) for _ in range(n))]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def cls_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "sentiment.csv", sentiment_rows(64))


@pytest.fixture
def qa_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows(48))


def tagged_rows(n: int, seed: int = 0) -> list[dict]:
    """Words tagged POS / NEG / O by which list they come from: learnable per word."""
    def tag(word: str) -> str:
        return "POS" if word in POSITIVE else "NEG" if word in NEGATIVE else "O"
    return [{"tokens": r["text"].split(), "tags": [tag(w) for w in r["text"].split()]} for r in sentiment_rows(n, seed)]


@pytest.fixture
def tagged_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "tagged.jsonl", tagged_rows(48))


@pytest.fixture(scope="session")
def tiny_llama64(tmp_path_factory) -> Path:
    """A tiny Llama wide enough for bitsandbytes' CPU 4-bit kernels (blocks of 64 inputs)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama64"), hidden=64)
