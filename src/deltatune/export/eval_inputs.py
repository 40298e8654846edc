"""The texts a runtime parity check compares on: the run's own evaluation split, re-read.

A run keeps no copy of its data, only its config and the data's fingerprint (``data.json``). The task's
pipeline on the configured files, with the run's seed, gives the same split back when the fingerprint
matches; when the files are gone or have changed, the check says so and uses seeded random token ids
instead (they still compare the two runtimes number for number, but not on the run's kind of text).
"""

from __future__ import annotations

import random

from ..errors import DeltatuneError
from ..inference import RunParts

MAX_TEXTS = 1000  # enough for a 0.1% agreement figure, in seconds on a small encoder
RANDOM_TEXTS, RANDOM_LENGTHS = 64, (4, 48)


def check_inputs(parts: RunParts) -> tuple[list[list[int]], str]:
    """Token ids of at most ``MAX_TEXTS`` texts (tokenized as in training), and where they come from."""
    try:
        rows = parts.task.rows()
    except (DeltatuneError, OSError) as exc:
        return random_inputs(parts, f"the run's data cannot be read ({str(exc).splitlines()[0]})")
    if rows.report["fingerprint"] != parts.run.read_json("data.json").get("fingerprint"):
        return random_inputs(parts, "the run's data files changed since training (another fingerprint)")
    split = "eval" if rows.splits["eval"] else "test"
    kept = rows.splits[split][:MAX_TEXTS]
    ids = [e["input_ids"] for e in parts.task.examples(kept, parts.tokenizer)]
    return ids, (f"{len(ids)} of {len(rows.splits[split])} texts of the run's {split} split "
                 f"(from {rows.report['files'].get('train', parts.cfg.data.train)})")


def random_inputs(parts: RunParts, why: str) -> tuple[list[list[int]], str]:
    rng = random.Random(0)
    special = set(parts.tokenizer.all_special_ids)
    vocab = [i for i in range(len(parts.tokenizer)) if i not in special]
    ids = [[rng.choice(vocab) for _ in range(rng.randint(*RANDOM_LENGTHS))] for _ in range(RANDOM_TEXTS)]
    return ids, f"{RANDOM_TEXTS} sequences of random token ids: {why}"
