"""Duplicates within a split and leakage between splits, exact and near.

Exact: two rows are duplicates when their input text is equal after normalisation and case
folding. Near: MinHash signatures over character n-grams estimate the Jaccard similarity of the
two n-gram sets; LSH (datasketch) finds candidate pairs without comparing every pair, and a
candidate counts when its estimated similarity reaches the threshold. The first occurrence is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import DedupConfig
from ..lazy import lazy

datasketch = lazy("datasketch")

Key = Callable[[dict], str]  # the text of a row that duplicates are judged on


@dataclass
class Leak:
    row: dict        # the eval/test row
    kind: str        # "exact" or "near"
    train_row: dict  # the training row it repeats


def shingles(text: str, n: int) -> set[str]:
    text = text.casefold()
    if len(text) <= n:
        return {text}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


class NearIndex:
    """A MinHash/LSH index of texts; ``match`` returns an indexed row at or above the threshold."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.lsh = datasketch.MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.items: dict[int, tuple[datasketch.MinHash, dict]] = {}
        # Drawing the random permutations is most of a MinHash's cost: draw them once per index.
        template = datasketch.MinHash(num_perm=cfg.num_perm, seed=1)
        self.permutations, self.scheme = template.permutations, template.scheme

    def signature(self, text: str) -> datasketch.MinHash:
        m = datasketch.MinHash(num_perm=self.cfg.num_perm, seed=1, permutations=self.permutations,
                               scheme=self.scheme)
        m.update_batch([s.encode("utf-8") for s in shingles(text, self.cfg.ngram)])
        return m

    def match(self, m: datasketch.MinHash) -> dict | None:
        best, best_sim = None, 0.0
        for key in self.lsh.query(m):
            other, row = self.items[key]
            sim = m.jaccard(other)
            if sim >= self.cfg.threshold and sim > best_sim:
                best, best_sim = row, sim
        return best

    def add(self, m: datasketch.MinHash, row: dict) -> None:
        key = len(self.items)
        self.items[key] = (m, row)
        self.lsh.insert(key, m)


def exact_duplicates(rows: list[dict], key: Key) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """(kept rows, [(removed row, the earlier row it repeats)])."""
    seen: dict[str, dict] = {}
    kept, removed = [], []
    for row in rows:
        k = key(row).casefold()
        if k in seen:
            removed.append((row, seen[k]))
        else:
            seen[k] = row
            kept.append(row)
    return kept, removed


def near_duplicates(rows: list[dict], key: Key, cfg: DedupConfig) -> tuple[list[dict], list[tuple[dict, dict]]]:
    index = NearIndex(cfg)
    kept, removed = [], []
    for row in rows:
        m = index.signature(key(row))
        twin = index.match(m)
        if twin is not None:
            removed.append((row, twin))
        else:
            index.add(m, row)
            kept.append(row)
    return kept, removed


def find_leaks(train: list[dict], other: list[dict], key: Key, cfg: DedupConfig, near: bool) -> list[Leak]:
    """Rows of ``other`` (eval or test) that repeat a training row, exactly or (if ``near``) nearly."""
    exact = {key(r).casefold(): r for r in reversed(train)}  # reversed: the first occurrence wins
    leaks, rest = [], []
    for row in other:
        twin = exact.get(key(row).casefold())
        if twin is not None:
            leaks.append(Leak(row, "exact", twin))
        else:
            rest.append(row)
    if near and rest:
        index = NearIndex(cfg)
        for row in train:
            index.add(index.signature(key(row)), row)
        for row in rest:
            twin = index.match(index.signature(key(row)))
            if twin is not None:
                leaks.append(Leak(row, "near", twin))
    return leaks
