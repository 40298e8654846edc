"""Data augmentation: EDA operations, augment_rows, oversampling, paraphrases, the WordNet lexicon."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from deltatune.data.augment import OPERATIONS, augment_rows, eda, oversample, paraphrase
from deltatune.data.lexicon import build_lexicon, load_lexicon, parse_synsets, read_wordnet
from deltatune.errors import AssetError

LEXICON = {"movie": ["film", "picture show"], "film": ["movie", "picture show"], "good": ["fine", "dependable"],
           "plot": ["story", "secret plan"], "story": ["plot"], "the": ["vitamin t"]}
TEXT = "The movie had a good plot and the film had a good cast too"


@pytest.mark.parametrize("seed", range(5))
def test_synonym_replaces_with_lexicon_words_only(seed):
    out = eda(TEXT, random.Random(seed), LEXICON, ["synonym"], alpha=0.2)
    assert out != TEXT
    allowed = set(TEXT.lower().split()) | {w for synonyms in LEXICON.values() for s in synonyms for w in s.split()}
    assert set(out.lower().split()) <= allowed
    assert "vitamin" not in out  # "the" is a stop word: never replaced


def test_synonym_keeps_case_and_punctuation():
    out = eda("Movie, please.", random.Random(0), {"movie": ["film"]}, ["synonym"])
    assert out == "Film, please."


@pytest.mark.parametrize("seed", range(5))
def test_insert_adds_synonyms_and_keeps_the_original_words_in_order(seed):
    words = TEXT.split()
    out = eda(TEXT, random.Random(seed), LEXICON, ["insert"], alpha=0.2)
    n = round(0.2 * len(words))
    synonym_words = {w for synonyms in LEXICON.values() for s in synonyms for w in s.split()}
    added = Counter(out.split()) - Counter(words)
    assert n <= sum(added.values()) <= 2 * n  # a multi-word synonym adds two words
    assert set(added) <= synonym_words
    remaining = iter(out.split())
    assert all(w in remaining for w in words)  # the original words are a subsequence of the output


@pytest.mark.parametrize("seed", range(5))
def test_swap_keeps_the_multiset_of_words(seed):
    out = eda(TEXT, random.Random(seed), LEXICON, ["swap"], alpha=0.2)
    assert out != TEXT
    assert Counter(out.split()) == Counter(TEXT.split())


@pytest.mark.parametrize("text", ["one", "two words", TEXT])
def test_delete_drops_words_but_never_all(text):
    for seed in range(30):
        out = eda(text, random.Random(seed), LEXICON, ["delete"], alpha=0.9)
        assert out.strip()
        assert not Counter(out.split()) - Counter(text.split())


def test_eda_is_deterministic_under_a_seed_and_varies_with_it():
    def run(seed):
        rng = random.Random(seed)
        return [eda(TEXT, rng, LEXICON) for _ in range(10)]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_eda_leaves_text_without_candidates_alone_and_rejects_unknown_operations():
    assert eda("", random.Random(0), LEXICON) == ""
    assert eda("zzz qqq", random.Random(0), LEXICON, ["synonym", "insert"]) == "zzz qqq"
    with pytest.raises(ValueError, match="synonym, insert"):
        eda(TEXT, random.Random(0), LEXICON, ["shuffle"])


def _rows():
    return [{"text": TEXT, "label": "pos", "_row": 2},
            {"text": "the movie was a good story", "label": "neg", "_row": 3},
            {"text": "zzz", "label": "neg", "_row": 4}]


def test_augment_rows_marks_copies_and_keeps_the_source_row():
    rows = _rows()
    out = augment_rows(rows, "text", per_row=3, seed=0, lexicon=LEXICON)
    assert rows == _rows()  # inputs untouched
    by_source = Counter(r["_row"] for r in out)
    assert 1 <= by_source[2] <= 3 and 1 <= by_source[3] <= 3
    assert by_source[4] == 0  # every edit of a single unknown word is the word itself: not produced
    for new in out:
        source = next(r for r in rows if r["_row"] == new["_row"])
        assert new["_augmented"] == "eda" and new["label"] == source["label"]
        assert new["text"] != source["text"]
    texts = [(r["_row"], r["text"]) for r in out]
    assert len(set(texts)) == len(texts)  # no duplicate variants of one row


def test_augment_rows_is_deterministic_given_the_seed():
    def run(seed):
        return augment_rows(_rows(), "text", per_row=4, seed=seed, lexicon=LEXICON)
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_oversample_balances_exactly():
    rows = [{"label": "a", "_row": i} for i in range(7)] + [{"label": "b", "_row": 10 + i} for i in range(3)] + \
           [{"label": "c", "_row": 20}]
    extra = oversample(rows, "label", seed=0)
    counts = Counter(r["label"] for r in rows + extra)
    assert counts == {"a": 7, "b": 7, "c": 7}
    assert all(r["_augmented"] == "oversample" for r in extra)
    b_uses = Counter(r["_row"] for r in extra if r["label"] == "b")
    assert sorted(b_uses.values()) == [1, 1, 2]  # 4 extra from 3 rows: spread evenly
    assert oversample(rows, "label", seed=0) == extra
    assert oversample(rows[:7], "label", seed=0) == []


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


def test_paraphrase_returns_marked_rows_from_a_causal_lm(tiny_lm):
    model, tokenizer = tiny_lm
    rows = [{"text": "the movie was good", "label": "positive", "_row": 2},
            {"text": "a very dull and boring film", "label": "negative", "_row": 3}]
    model.train()
    out = paraphrase(rows, "text", model, tokenizer, per_row=2, seed=0, max_new_tokens=6)
    assert model.training  # generated in eval mode, then the caller's mode is restored
    assert 1 <= len(out) <= 4
    for new in out:
        source = next(r for r in rows if r["_row"] == new["_row"])
        assert new["_augmented"] == "paraphrase" and new["label"] == source["label"]
        assert isinstance(new["text"], str) and new["text"].strip() and "\n" not in new["text"]
        assert new["text"] != source["text"]
    assert paraphrase(rows, "text", model, tokenizer, per_row=2, seed=0, max_new_tokens=6) == out


# ----------------------------------------------------------------------------- lexicon

LICENSE_HEADER = """  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  
"""
# Hand-written lines in WordNet's data.* format; the last synset has 0x0b = 11 words.
ELEVEN = " ".join(f"w{i} 0" for i in range(10))
DATA = {
    "data.adj": LICENSE_HEADER + "00001740 00 a 02 good 0 full(p) 0 000 | having desirable qualities  \n",
    "data.adv": LICENSE_HEADER + "00002098 02 r 01 alone 0 000 | without others  \n",
    "data.noun1": LICENSE_HEADER + "07716358 13 n 03 movie 0 film 0 motion_picture 0 001 @ 07715721 n 0000 | a film  ",
    "data.noun2": "07716504 13 n 02 film 0 photographic_film 0 000 | a medium  \n",
    "data.verb": LICENSE_HEADER + f"00001000 29 v 0b Run 0 {ELEVEN} 000 | move fast  \n",
}


@pytest.fixture
def wordnet_dir(tmp_path):
    for name, text in DATA.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "LICENSE.txt").write_text("WordNet Release 3.0\n", encoding="utf-8")
    return tmp_path


def test_parse_synsets_skips_the_header_and_reads_hex_word_counts():
    synsets = list(parse_synsets(DATA["data.verb"].splitlines(), "data.verb"))
    assert synsets == [["run"] + [f"w{i}" for i in range(10)]]


def test_parse_synsets_names_the_file_and_line_of_a_bad_line():
    with pytest.raises(AssetError, match="data.adj: line 2"):
        list(parse_synsets(["00001740 00 a 01 good 0 000 | ok", "garbage"], "data.adj"))


def test_read_wordnet_groups_synonyms_across_synsets(wordnet_dir):
    table = read_wordnet(wordnet_dir)
    # "film" is in a synset from each noun file: data.noun1 has no final newline, yet both count.
    assert table["film"] == ["motion picture", "movie", "photographic film"]
    assert table["movie"] == ["film", "motion picture"]
    assert table["good"] == ["full"]  # the (p) marker is stripped
    assert table["run"] == [f"w{i}" for i in range(10)]  # lower-cased, the word itself excluded
    assert "alone" not in table  # a one-word synset gives no synonyms
    assert "motion picture" not in table  # keys are single words


def test_build_and_load_lexicon(wordnet_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("deltatune.data.lexicon.MIN_WORDS", 1)
    target = build_lexicon(wordnet_dir, tmp_path / "out" / "lexicon.json")
    assert load_lexicon(target) == json.loads(target.read_text())
    assert (target.parent / "LICENSE-wordnet.txt").is_file()
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(AssetError, match="deltatune assets --install"):
        load_lexicon()


def test_operations_match_the_config_defaults():
    from deltatune.config import AugmentConfig

    assert tuple(AugmentConfig().operations) == OPERATIONS
