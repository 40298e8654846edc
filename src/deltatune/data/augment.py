"""More training rows from few: EDA edits, class oversampling and paraphrases by a causal LM.

EDA is Wei & Zou 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on Text
Classification": synonym replacement, random insertion, random swap and random deletion, with
alpha the share of words changed. Unlike the reference code we keep the text's case and
punctuation: words are looked up by their lower-cased core ("Movie," -> "movie") and a synonym
takes over the original's capital and surrounding punctuation.

Every new row is a copy of its source row (so ``_row`` still points at the line in the user's
file) marked with ``_augmented``: "eda", "oversample" or "paraphrase".
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from ..config import EDA_OPERATIONS as OPERATIONS  # defined once, where data.augment.operations is checked
from ..errors import DataError
from .examples import prompt_text
from .load import ROW

MARK = "_augmented"
# Function words: replacing them changes grammar, not wording, and WordNet's entries for them are
# mostly noise ("a" -> "vitamin a", "it" -> "information technology").
STOP_WORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below "
    "between both but by can could did do does doing down during each few for from further had has have "
    "having he her here hers herself him himself his how i if in into is it its itself just me more most "
    "my myself no nor not now of off on once only or other our ours ourselves out over own same she should "
    "so some such than that the their theirs them themselves then there these they this those through to "
    "too under until up very was we were what when where which while who whom why will with would you "
    "your yours yourself yourselves".split())
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)  # leading punctuation, word, trailing punctuation


# ----------------------------------------------------------------------------- EDA

def eda(text: str, rng: random.Random, lexicon: Mapping[str, list[str]], operations: Sequence[str] = OPERATIONS,
        alpha: float = 0.1) -> str:
    """One EDA edit of ``text``, chosen at random from ``operations``; deterministic given ``rng``."""
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(f"eda: unknown or no operations {list(operations)}; choose from {', '.join(OPERATIONS)}")
    words = text.split()
    if not words:
        return text
    op = rng.choice(list(operations))
    n = max(1, round(alpha * len(words)))
    if op == "synonym":
        return " ".join(_replace_synonyms(words, n, rng, lexicon))
    if op == "insert":
        return " ".join(_insert_synonyms(words, n, rng, lexicon))
    if op == "swap":
        return " ".join(_swap(words, n, rng))
    return " ".join(_delete(words, alpha, rng))


def _synonyms(word: str, lexicon: Mapping[str, list[str]]) -> list[str]:
    core = _CORE.match(word).group(2).lower()
    return [] if core in STOP_WORDS else lexicon.get(core, [])


def _in_place_of(word: str, synonym: str) -> str:
    """The synonym wearing the original word's punctuation and leading capital."""
    before, core, after = _CORE.match(word).groups()
    if core[:1].isupper():
        synonym = synonym[:1].upper() + synonym[1:]
    return before + synonym + after


def _replace_synonyms(words: list[str], n: int, rng: random.Random, lexicon) -> list[str]:
    """Replace n distinct words (every occurrence of each, so a repeated word stays consistent)."""
    cores = sorted({_CORE.match(w).group(2).lower() for w in words if _synonyms(w, lexicon)})
    rng.shuffle(cores)
    chosen = {core: rng.choice(lexicon[core]) for core in cores[:n]}
    out = []
    for word in words:
        synonym = chosen.get(_CORE.match(word).group(2).lower())
        out.append(_in_place_of(word, synonym) if synonym else word)
    return out


def _insert_synonyms(words: list[str], n: int, rng: random.Random, lexicon) -> list[str]:
    """Insert a synonym of a random word at a random position, n times (if any word has one)."""
    words = list(words)
    for _ in range(n):
        candidates = [w for w in words if _synonyms(w, lexicon)]
        if not candidates:
            break
        synonym = rng.choice(_synonyms(rng.choice(candidates), lexicon))
        words.insert(rng.randrange(len(words) + 1), synonym)
    return words


def _swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(n):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def _delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Drop each word with probability p, but never all of them (keep one at random then)."""
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def augment_rows(rows: list[dict], column: str, per_row: int, seed: int, lexicon: Mapping[str, list[str]],
                 operations: Sequence[str] = OPERATIONS, alpha: float = 0.1) -> list[dict]:
    """Up to ``per_row`` EDA variants of each row; edits that change nothing or repeat are dropped."""
    out = []
    for index, row in enumerate(rows):
        text = _text(row, column)
        # One generator per row: a row's variants do not depend on the rows before it.
        rng = random.Random(f"{seed}/{index}")
        seen = {text}
        for _ in range(per_row):
            new = eda(text, rng, lexicon, operations, alpha)
            if new not in seen:
                seen.add(new)
                out.append({**row, column: new, MARK: "eda"})
    return out


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError(f"{row.get('_file', 'data')}: row {row.get(ROW, '?')}: column {column!r} is "
                        f"{type(value).__name__}, not text; augmentation edits text columns only")
    return value


# ----------------------------------------------------------------------------- class balance

def oversample(rows: list[dict], label_column: str, seed: int) -> list[dict]:
    """The extra rows that bring every label up to the largest class's count.

    Rows of a small class are repeated in shuffled rounds, so each is used as evenly as possible.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if label_column not in row:
            raise DataError(f"{row.get('_file', 'data')}: row {row.get(ROW, '?')}: no column "
                            f"{label_column!r} to balance classes by; check data.label_column")
        groups[row[label_column]].append(row)
    largest = max((len(g) for g in groups.values()), default=0)
    rng = random.Random(seed)
    extra = []
    for label in sorted(groups, key=str):
        group = list(groups[label])
        rng.shuffle(group)
        need = largest - len(group)
        extra += [{**group[i % len(group)], MARK: "oversample"} for i in range(need)]
    return extra


# ----------------------------------------------------------------------------- paraphrase

def paraphrase(rows: list[dict], column: str, model, tokenizer, per_row: int = 1, seed: int = 0,
               max_new_tokens: int = 64,
               prompt: str = "Paraphrase the following text, keeping its meaning:\n{text}\nParaphrase:",
               batch_size: int = 8) -> list[dict]:
    """Up to ``per_row`` paraphrases of each row sampled (top-p) from a causal LM."""
    import torch

    was_training = model.training
    model.eval()
    out = []
    # A private RNG stream: the same seed gives the same paraphrases, and training's seed is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            texts = [_text(row, column) for row in batch]
            outputs = _generate(model, tokenizer, [prompt.format(text=t) for t in texts], per_row, max_new_tokens)
            for i, (row, text) in enumerate(zip(batch, texts)):
                seen = {text.strip()}
                for new in outputs[i * per_row:(i + 1) * per_row]:
                    if new and new not in seen:
                        seen.add(new)
                        out.append({**row, column: new, MARK: "paraphrase"})
    model.train(was_training)
    return out


def _generate(model, tokenizer, prompts: list[str], per_row: int, max_new_tokens: int) -> list[str]:
    """per_row sampled continuations of each prompt (first line only), prompt-major order."""
    import torch

    chat = bool(getattr(tokenizer, "chat_template", None))
    ids = [tokenizer(prompt_text(tokenizer, p, chat), add_special_tokens=False)["input_ids"] for p in prompts]
    if not chat and tokenizer.bos_token_id is not None:  # as in training (examples.encode_sft)
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(x) for x in ids)
    # Left padding: every prompt then ends at the same column, where generation starts.
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    device = next(model.parameters()).device
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=True,
                                   top_p=0.9, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=per_row,
                                   pad_token_id=pad)
    texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [(t.strip().splitlines() or [""])[0].strip() for t in texts]
