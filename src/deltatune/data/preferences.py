"""Preference data for reward models, DPO and PPO: which response to a prompt is better.

A file (CSV, TSV, JSON, JSONL, Parquet or a saved `datasets` folder; see ``load.load_table``)
holds rows of either shape, mixed freely:

- a pair:    ``{"prompt": ..., "chosen": ..., "rejected": ...}``
- a ranking: ``{"prompt": ..., "responses": [r0, r1, r2], "ranking": [2, 0, 1]}``
  where ``ranking`` lists indices into ``responses`` best first: here r2 is best, r1 worst.
  Indices rather than scores because a ranking is what annotators produce, ties cannot be
  expressed by accident, and "is it a permutation of 0..k-1" is a check a person can read.

CSV and TSV cells cannot hold lists, so there ``responses`` and ``ranking`` are JSON arrays
written in the cell (``["a", "b"]``, ``[1, 0]``); in the other formats they are real lists.
Other columns are ignored. Text is kept exactly as written (no stripping).

A bad row (a field missing, empty or of the wrong type; chosen equal to rejected; a ranking that
is not a permutation; fewer than 2 responses) raises a DataError naming file and row, or with
``on_error="skip"`` goes to ``rejects`` as ``{"file", "row", "reason"}``.

Thumbs (KTO, ``load_thumbs``): one completion with a thumbs up or down, no comparison,

- a thumbs row: ``{"prompt": ..., "completion": ..., "label": true}``

where ``label`` is true/false, up/down or 1/0 (true, up and 1: a desirable completion): JSON and
Parquet booleans or numbers, or that text in any case (CSV cells). Anything else is a bad row. Pair
and ranking rows may be mixed in: a pair gives its chosen response as desirable and its rejected
one as undesirable, a ranking its best and its worst response (the middle ones carry no absolute
judgement).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .load import FILE, ROW, load_table

PAIR_FIELDS = ("chosen", "rejected")
RANKING_FIELDS = ("responses", "ranking")
THUMBS_FIELDS = ("completion", "label")
UP, DOWN = ("true", "up", "1"), ("false", "down", "0")  # thumbs labels written as text, lower case


@dataclass
class Preference:
    """One prompt and two or more responses to it, best first."""
    prompt: str
    responses: list[str]  # best first
    source: tuple[str, int]  # (file, row) as load_table numbers rows


@dataclass
class Thumb:
    """One prompt, one completion and whether the completion is desirable (thumbs up) or not."""
    prompt: str
    completion: str
    desirable: bool
    source: tuple[str, int]  # (file, row) as load_table numbers rows


class _BadRow(Exception):
    """Why a row cannot be used (becomes a DataError or a reject)."""


def load_preferences(path: str | Path, on_error: str = "fail", rejects: list[dict] | None = None) -> list[Preference]:
    """Read pairs and rankings from ``path``; see the module docstring for the row shapes."""
    return _load(path, on_error, rejects, lambda row: [parse_preference(row)], "preference")


def load_thumbs(path: str | Path, on_error: str = "fail", rejects: list[dict] | None = None) -> list[Thumb]:
    """Read thumbs rows, and pairs and rankings as thumbs, from ``path`` (see the module docstring)."""
    return _load(path, on_error, rejects, parse_thumbs, "thumbs")


def _load(path: str | Path, on_error: str, rejects: list[dict] | None, parse, kind: str) -> list:
    """``parse`` (a row -> a list of items, or _BadRow) over the rows of ``path``, bad rows failing or skipped."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error={on_error!r}; use 'fail' or 'skip'")
    skip = on_error == "skip"
    sink = rejects if rejects is not None else []
    before = len(sink)
    rows = load_table(path, sink if skip else None)
    out = []
    for row in rows:
        try:
            out.extend(parse(row))
        except _BadRow as exc:
            if not skip:
                raise DataError(f"{row[FILE]}: row {row[ROW]}: {exc}. Fix the row, or set data.on_error=skip to "
                                "skip bad rows") from None
            sink.append({"file": row[FILE], "row": row[ROW], "reason": str(exc)})
    skipped = sink[before:]
    if not out:
        first = f" (first: row {skipped[0]['row']}: {skipped[0]['reason']})" if skipped else ""
        raise DataError(f"{path}: no usable {kind} rows; all {len(skipped)} were rejected{first}")
    if skipped and rejects is None:
        print(f"note: {path}: skipped {len(skipped)} bad {kind} row(s); pass a rejects list to see them",
              file=sys.stderr)
    return out


def parse_preference(row: dict) -> Preference:
    """One row from ``load_table`` as a Preference, or _BadRow saying what is wrong."""
    prompt = _text(row, "prompt")
    if _shape(row) == "pair":
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        if chosen.strip() == rejected.strip():
            raise _BadRow("'chosen' and 'rejected' are the same text; a preference needs two different responses")
        responses = [chosen, rejected]
    else:
        responses = _ranked_responses(row)
    return Preference(prompt, responses, (row[FILE], row[ROW]))


def parse_thumbs(row: dict) -> list[Thumb]:
    """One row from ``load_table`` as thumbs (a thumbs row gives one; a pair or a ranking two), or _BadRow."""
    thumbs = [k for k in THUMBS_FIELDS if _filled(row.get(k))]
    compared = [k for k in PAIR_FIELDS + RANKING_FIELDS if _filled(row.get(k))]
    if thumbs and compared:
        raise _BadRow(f"fills in {thumbs[0]!r} (a thumbs row) and {compared[0]!r} (a preference); a row is either "
                      "a completion with a label or a preference: empty one set")
    source = (row[FILE], row[ROW])
    if thumbs or (not compared and any(k in row for k in THUMBS_FIELDS)):
        return [Thumb(_text(row, "prompt"), _text(row, "completion"), _thumb_label(row), source)]
    if compared or any(k in row for k in PAIR_FIELDS + RANKING_FIELDS):
        pref = parse_preference(row)
        best, worst = pref.responses[0], pref.responses[-1]
        return [Thumb(pref.prompt, best, True, source), Thumb(pref.prompt, worst, False, source)]
    fields = ", ".join(k for k in row if k not in (ROW, FILE))
    raise _BadRow(f"needs 'completion' and 'label' (a completion with a thumbs up or down), or a preference: "
                  f"'chosen' and 'rejected', or 'responses' and 'ranking'; it has: {fields}")


def _thumb_label(row: dict) -> bool:
    """True for a desirable completion: see UP and DOWN; JSON/Parquet booleans and the numbers 1 and 0 too."""
    accepted = "use true or false, up or down, 1 or 0 (true, up and 1 mark a desirable completion)"
    if "label" not in row:
        raise _BadRow(f"no 'label' field; {accepted}")
    value = row["label"]
    if not _filled(value):
        raise _BadRow(f"'label' is empty; {accepted}")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in UP + DOWN:
        return value.strip().lower() in UP
    raise _BadRow(f"'label' is {value!r}; {accepted}")


def to_pairs(prefs: list[Preference]) -> list[tuple[str, str, str]]:
    """Every ``(prompt, chosen, rejected)`` a preference implies: for a ranking of k responses,
    all k(k-1)/2 pairs (i better than j for every i < j), not only the k-1 adjacent ones.

    The ranking asserts all of them, so dropping the non-adjacent pairs throws away labels
    (InstructGPT, Ouyang et al. 2022, trains on all of them). They are not independent, though:
    one prompt's pairs come out consecutively so a caller can keep them in one batch, as
    InstructGPT does to avoid over-fitting to a prompt seen k(k-1)/2 times per epoch.
    """
    return [(p.prompt, p.responses[i], p.responses[j])
            for p in prefs for i in range(len(p.responses)) for j in range(i + 1, len(p.responses))]


# ----------------------------------------------------------------------------- fields

def _filled(value: object) -> bool:
    return not (value is None or (isinstance(value, float) and value != value)
                or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value))


def _shape(row: dict) -> str:
    """'pair' or 'ranking': whichever set of fields the row fills in."""
    pair = any(_filled(row.get(k)) for k in PAIR_FIELDS)
    ranking = any(_filled(row.get(k)) for k in RANKING_FIELDS)
    if pair and ranking:
        raise _BadRow("fills in both 'chosen'/'rejected' and 'responses'/'ranking'; a row is either a pair or a "
                      "ranking: empty one set")
    if pair or ranking:
        return "pair" if pair else "ranking"
    if any(k in row for k in PAIR_FIELDS):
        return "pair"  # present but empty: the pair checks name the empty field
    if any(k in row for k in RANKING_FIELDS):
        return "ranking"
    fields = ", ".join(k for k in row if k not in (ROW, FILE))
    raise _BadRow(f"needs 'chosen' and 'rejected' (a pair) or 'responses' and 'ranking' (indices best first); "
                  f"it has: {fields}")


def _text(row: dict, field: str) -> str:
    if field not in row:
        raise _BadRow(f"no {field!r} field")
    value = row[field]
    if not _filled(value):
        raise _BadRow(f"{field!r} is empty")
    if not isinstance(value, str):
        raise _BadRow(f"{field!r} must be text, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__} (conversations as message lists are not supported; give the text)"
    return f"{type(value).__name__} {value!r}"


def _list(row: dict, field: str, example: str) -> list:
    if field not in row:
        raise _BadRow(f"no {field!r} field; a ranking needs 'responses' and 'ranking'")
    value = row[field]
    if not _filled(value):
        raise _BadRow(f"{field!r} is empty")
    if isinstance(value, str) and Path(row[FILE]).suffix.lower() in (".csv", ".tsv"):
        try:
            value = json.loads(value)
        except ValueError:
            raise _BadRow(f"{field!r} is not a JSON array; in a CSV cell write it as {example}") from None
    if not isinstance(value, list):
        raise _BadRow(f"{field!r} must be a list like {example}, got {type(value).__name__}")
    return value


def _ranked_responses(row: dict) -> list[str]:
    """The responses reordered best first, after checking them and the ranking."""
    responses = _list(row, "responses", '["first answer", "second answer"]')
    if len(responses) < 2:
        raise _BadRow(f"'responses' has {len(responses)}; a preference needs at least 2 responses to compare")
    for i, response in enumerate(responses):
        if not _filled(response):
            raise _BadRow(f"responses[{i}] is empty")
        if not isinstance(response, str):
            raise _BadRow(f"responses[{i}] must be text, got {_kind(response)}")
    seen: dict[str, int] = {}
    for i, response in enumerate(responses):
        if response.strip() in seen:
            raise _BadRow(f"responses[{seen[response.strip()]}] and responses[{i}] are the same text; "
                          "a ranking needs different responses")
        seen[response.strip()] = i
    ranking = _list(row, "ranking", "[1, 0] (indices into responses, best first)")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking):
        raise _BadRow(f"'ranking' must hold whole-number indices into 'responses', got {ranking!r}")
    if sorted(ranking) != list(range(len(responses))):
        raise _BadRow(f"'ranking' {ranking!r} is not a permutation of 0..{len(responses) - 1}: list each index "
                      f"into 'responses' exactly once, best first")
    return [responses[i] for i in ranking]
