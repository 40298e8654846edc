"""Seeded splits that keep label proportions: hold-out, three-way, k-fold, limits and few-shot.

Stratification works per label group: each group is shuffled with the seed and cut by the
requested share, rounded per group, so every split's label counts are within one example of
the exact proportion.
"""

from __future__ import annotations

import random
from collections import defaultdict

from ..errors import DataError


def _groups(rows: list[dict], label: str | None) -> list[list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[str(row[label]) if label else ""].append(row)
    return [groups[k] for k in sorted(groups)]


def split_rows(rows: list[dict], fraction: float, seed: int, label: str | None) -> tuple[list[dict], list[dict]]:
    """Seeded hold-out split, stratified by label when one is given: (kept, held out)."""
    rng = random.Random(seed)
    kept, held = [], []
    for group in _groups(rows, label):
        group = group[:]
        rng.shuffle(group)
        n_held = round(len(group) * fraction)
        held += group[:n_held]
        kept += group[n_held:]
    rng.shuffle(kept)
    rng.shuffle(held)
    return kept, held


def three_way(rows: list[dict], eval_fraction: float, test_fraction: float, seed: int,
              label: str | None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, test) with the given shares of the whole; test is empty for test_fraction 0."""
    rest, test = split_rows(rows, test_fraction, seed + 1, label) if test_fraction else (rows, [])
    train, held = split_rows(rest, eval_fraction / (1 - test_fraction), seed, label)
    return train, held, test


def kfold(rows: list[dict], k: int, fold: int, seed: int, label: str | None) -> tuple[list[dict], list[dict]]:
    """Stratified k-fold: every row is in exactly one fold's eval split; returns fold ``fold``."""
    rng = random.Random(seed)
    dealt = []  # rows dealt round-robin per label, so each fold gets every label's share
    for group in _groups(rows, label):
        group = group[:]
        rng.shuffle(group)
        dealt += group
    held = dealt[fold::k]
    held_ids = {id(r) for r in held}
    train = [r for r in dealt if id(r) not in held_ids]
    rng.shuffle(train)
    return train, held


def take(rows: list[dict], n: int, seed: int, label: str | None) -> list[dict]:
    """At most n rows, keeping label proportions when a label is given."""
    if n >= len(rows):
        return rows
    if label is None:
        return random.Random(seed).sample(rows, n)
    kept, _ = split_rows(rows, 1 - n / len(rows), seed, label)
    return kept[:n]


def shots(rows: list[dict], per_class: int, seed: int, label: str, where: str) -> list[dict]:
    """Exactly ``per_class`` rows of every label (few-shot training sets)."""
    rng = random.Random(seed)
    out = []
    for group in _groups(rows, label):
        if len(group) < per_class:
            raise DataError(f"{where}: label {group[0][label]!r} has only {len(group)} training row(s), "
                            f"fewer than data.shots_per_class={per_class}; lower it or add examples")
        out += rng.sample(group, per_class)
    rng.shuffle(out)
    return out
