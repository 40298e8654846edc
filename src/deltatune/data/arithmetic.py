"""A small arithmetic data set for GRPO's verifiable reward, generated offline and deterministically.

Each row is ``{"prompt": "What is 7 + 5?", "answer": 12}``: the ``arithmetic`` reward (rlhf/rewards.py)
pays 1 when a completion's last number is the answer. The rows depend only on (n, seed, max_operand),
so the shipped file ``examples/arithmetic.jsonl`` is this module's output, written by

    python -m deltatune.data.arithmetic examples/arithmetic.jsonl

and a test checks that the two agree.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b}


def problems(n: int = 400, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """``n`` distinct problems ``a + b`` or ``a - b`` with 0 <= a, b <= ``max_operand``, in a random order."""
    space = [(a, op, b) for a in range(max_operand + 1) for op in OPERATIONS for b in range(max_operand + 1)]
    if not 0 < n <= len(space):
        raise ValueError(f"n={n}: there are {len(space)} distinct problems with operands up to {max_operand}")
    rows = []
    for a, op, b in random.Random(seed).sample(space, n):
        rows.append({"prompt": f"What is {a} {op} {b}?", "answer": OPERATIONS[op](a, b)})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the arithmetic problems as JSONL (prompt, answer).")
    parser.add_argument("path", type=Path)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-operand", type=int, default=20)
    args = parser.parse_args(argv)
    write(args.path, problems(args.n, args.seed, args.max_operand))


if __name__ == "__main__":
    main()
