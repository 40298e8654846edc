"""What both sides of benchmarks/run.py share: the workloads' configs, the training order, and how a
side's per-step records become one measurement.

Both sides train deltatune's prepared examples (same cleaning, tokenization and truncation), in
the order deltatune's loop draws them in its first epoch, for the same number of steps at the same
batch size, learning rate (linear decay to 0, no warm-up), seed and method options. Both time the
same part of each step: forward, backward, gradient clipping, optimizer and scheduler step; data
loading and collation, logging and evaluation are outside it. The first ``warmup`` steps are
trained but not timed.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    config: str               # under configs/
    overrides: tuple[str, ...]
    steps: int                # measured steps when --steps is not given
    description: str


WORKLOADS = {
    "smollm2-lora": Workload(
        "smollm2-135m/causal_lm-lora.yaml",
        ("data.train=pang-lee-reviews", "data.eval=pang-lee-sentences", "method.target_modules=[q_proj,v_proj]",
         "train.max_length=512", "train.batch_size=4"),
        6, "SmolLM2-135M, LoRA r=16 alpha=32 dropout=0.05 on q_proj/v_proj, language modelling on the text of "
           "the 1,500 Pang & Lee reviews truncated to 512 tokens, batch 4, lr 1e-3"),
    "minilm-cls-full": Workload(
        "minilm/classification-full.yaml",
        ("data.train=pang-lee-sentences", "data.eval=pang-lee-reviews", "train.max_length=128",
         "train.batch_size=32"),
        30, "MiniLM-L6 (22.7M), full fine-tuning, polarity of the 4,000 Pang & Lee sentences, max length 128, "
            "batch 32, lr 5e-5"),
    "minilm-cls-lora": Workload(
        "minilm/classification-lora.yaml",
        ("data.train=pang-lee-sentences", "data.eval=pang-lee-reviews", "train.max_length=128",
         "train.batch_size=32"),
        30, "MiniLM-L6 (22.7M), LoRA r=8 alpha=16 dropout=0.1 on query/key/value/dense (+ the new head), "
            "polarity of the 4,000 Pang & Lee sentences, max length 128, batch 32, lr 5e-4"),
}

# Identical on both sides: a constant-length run with no evaluation until the end (ours evaluates 4
# rows once the last step is timed), no warm-up of the learning rate, no progress bar.
COMMON = ("train.warmup_ratio=0", "train.grad_accum=1", "train.eval_every=1000000000", "data.eval_limit=4",
          "train.eval_batch_size=4", "train.progress=false", "eval.forgetting=false")


def build_config(workload: str, total_steps: int, model: str | None = None, train: str | None = None,
                 extra: tuple[str, ...] = ()):
    """The deltatune config of a workload; ``model``/``train`` replace its model and data (tiny smoke runs),
    ``extra`` are our side's overrides."""
    from deltatune.configure import load_config

    w = WORKLOADS[workload]
    swap = ([f"model={model}"] if model else []) + ([f"data.train={train}", f"data.eval={train}"] if train else [])
    return load_config(ROOT / "configs" / w.config,
                       [*w.overrides, *COMMON, f"train.max_steps={total_steps}", *swap, *extra])


def train_order(n: int, seed: int) -> list[int]:
    """The first-epoch order of deltatune's loop, drawn the way it draws it: a shuffling DataLoader whose
    generator is seeded with train.seed + epoch (the loader's iterator takes a seed from the generator
    before its sampler does). Each side checks this order against the tokens it trained on."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(range(n), batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return [int(batch) for batch in loader]


def check_budget(n_examples: int, batch: int, steps: int) -> None:
    if steps * batch > n_examples:
        raise SystemExit(f"{steps} steps x batch {batch} needs {steps * batch} training rows but there are "
                         f"{n_examples}; the benchmark stays within one epoch: lower --steps")


def fingerprint(examples: list[dict]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e["input_ids"], e.get("labels", e.get("label"))]).encode())
    return digest.hexdigest()[:16]


def checksum(model) -> float:
    """Sum of the trainable weights at the start: equal on both sides iff (practically) the same ones."""
    return float(sum(p.detach().double().sum() for p in model.parameters() if p.requires_grad))


@dataclass
class Step:
    seconds: float   # forward, backward, clipping, optimizer and scheduler
    tokens: int      # non-padding tokens of the step's batch
    loss: float
    wall: float      # time.perf_counter() when the step ended
    cpu: float       # time.process_time() (all threads) when the step ended


def summarize(steps: list[Step], warmup: int, examples: list[dict], order: list[int], batch: int) -> dict:
    """One side's measurement: steps after the warm-up, and what was trained on."""
    import torch

    timed = steps[warmup:]
    seconds, tokens = sum(s.seconds for s in timed), sum(s.tokens for s in timed)
    wall, cpu = steps[-1].wall - steps[warmup - 1].wall, steps[-1].cpu - steps[warmup - 1].cpu
    threads = torch.get_num_threads()
    planned = [sum(len(examples[i]["input_ids"]) for i in order[k * batch:(k + 1) * batch])
               for k in range(len(steps))]
    return {
        "tokens_per_s": tokens / seconds, "s_per_step": seconds / len(timed),
        "wall_s_per_step": wall / len(timed),  # step end to step end: adds data loading and logging
        "cpu_util": cpu / (wall * threads), "threads": threads,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": len(steps), "timed_steps": len(timed), "rows_seen": len(steps) * batch,
        "tokens_seen": sum(s.tokens for s in steps), "tokens_per_step": [s.tokens for s in steps],
        "order_verified": planned == [s.tokens for s in steps], "train_rows": len(examples),
        "fingerprint": fingerprint(examples), "losses": [s.loss for s in steps],
        "first_loss": steps[0].loss, "final_loss": steps[-1].loss,
    }


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def run_and_write(parser, measure, name: str) -> dict:
    """A benchmark's main: parse its arguments (``--out`` added, default benchmarks/results/<name>.json), make
    deltatune importable from this checkout, run ``measure(args)``, write the result as JSON and print it."""
    import sys

    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / f"{name}.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    result = measure(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result
