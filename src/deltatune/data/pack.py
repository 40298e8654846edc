"""Packing: several short causal-LM examples share one row, with no attention between them.

Each packed row carries ``position_ids`` that restart at 0 where an example starts. When a
decoder gets such position ids with no 2-D ``attention_mask`` and no KV cache, transformers
(``masking_utils.create_causal_mask`` -> ``find_packed_sequence_indices``) cuts the row into
segments and builds a block-diagonal causal mask, so every example sees only itself and gets the
logits it gets alone. ``collate`` drops the attention mask for packed rows and
``eval.evaluate.forward`` turns the cache off to meet those conditions.

Not for soft-prompt methods (prompt tuning, P-tuning, prefix tuning): peft drops position ids or
passes a prefix cache, either of which turns the block-diagonal mask back into a plain causal one,
and only the row's first example would follow the virtual tokens.
"""

from __future__ import annotations

from bisect import bisect_left, insort

from ..errors import DataError
from .examples import IGNORE


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Causal-LM examples -> rows of at most ``max_length`` tokens, each example whole in one row.

    A row is ``{"input_ids", "labels", "position_ids", "lengths", "indices"}``: ``lengths`` and
    ``indices`` give each packed example's length and position in ``examples``. Deterministic.
    """
    _check(examples, max_length)
    return [_row(examples, members) for members in _assign(examples, max_length)]


def _check(examples: list[dict], max_length: int) -> None:
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if not 0 < n <= max_length:
            raise DataError(f"example {i} has {n} tokens; packing needs 1 to max_length={max_length} "
                            "(truncate examples to the packing length before packing)")
        if len(e.get("labels", ())) != n:
            raise DataError(f"example {i} has {len(e.get('labels', ()))} labels for {n} tokens; packing "
                            "is for causal-LM examples, whose labels align with their input_ids")


def _assign(examples: list[dict], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: longest example first, each into the open row it fills most tightly.

    Sorting by length first packs far tighter than taking examples in order (fewer rows, less
    padding; the loop shuffles rows anyway), and keeping free space in a sorted list finds the
    tightest row by bisection rather than by scanning every row as plain first-fit does.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, row index) of rows that can still take a token
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space > n:
            insort(free, (space - n, row))
    # Examples keep their input order inside a row, and rows follow their first example.
    return sorted(sorted(members) for members in rows)


def _row(examples: list[dict], members: list[int]) -> dict:
    input_ids, labels, position_ids = [], [], []
    for i in members:
        e = examples[i]
        input_ids += e["input_ids"]
        # Alone, an example's first token is never a target (causal_lm_loss predicts labels[t + 1]
        # from position t). Packed, it would be predicted from the previous example's last token:
        # ignoring it keeps the packed loss equal to the unpacked one.
        labels += [IGNORE] + list(e["labels"][1:])
        position_ids += range(len(e["input_ids"]))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "lengths": [len(examples[i]["input_ids"]) for i in members], "indices": list(members)}
