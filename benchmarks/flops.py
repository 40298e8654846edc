"""Achieved FLOP/s of a harness run, as a fraction of this machine's measured matrix-product peaks.

    python benchmarks/flops.py --results benchmarks/results/loop_vs_trainer.jsonl [--out FILE]

First measures the peak of one matrix product on all threads, fp32 and bf16 (square 2048 and a
transformer-shaped 2048 x 576 x 1536; the best median of the two), then, for each workload in the
results file, counts the floating-point operations of the matrix products (``torch.utils.flop_counter``:
mm, addmm, bmm and SDPA attention, forward and backward) in the timed steps each side ran: ours on its
batches (with its ``--ours-override``s), the baseline on the Trainer's (shuffled, padded to each
batch's longest, plain loss). Achieved GFLOP/s = those FLOPs / the side's summed step time; the fractions are of the
peaks just measured. Causal attention is counted in full (as torch counts it) on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench_common import build_config

# The Trainer's batches and loss: shuffled (not length-grouped), the plain cross-entropy over the logits.
TRAINER_LIKE = ["train.group_by_length=false", "train.chunked_loss=false"]
SHAPES = {"square 2048": (2048, 2048, 2048), "2048 x 576 x 1536": (2048, 576, 1536)}


def matmul_peak(dtype: torch.dtype, repeats: int = 7) -> dict:
    """Median GFLOP/s of ``a @ b`` per shape, and the best of them."""
    out = {}
    for name, (m, k, n) in SHAPES.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        out[name] = 2 * m * k * n / statistics.median(times) / 1e9
    return {"gflops": max(out.values()), "by_shape": out}


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

    def as_registered(formula):  # torch's formulas are already wrapped to take tensors: pass them as they are
        def call(*args, **kwargs):
            return formula(*args, **kwargs)
        call._get_raw = True
        return call

    aten = torch.ops.aten
    cpu = {}  # the CPU flash-attention kernels, which torch's table does not list
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        cpu[aten._scaled_dot_product_flash_attention_for_cpu] = as_registered(sdpa_flop)
        cpu[aten._scaled_dot_product_flash_attention_for_cpu_backward] = as_registered(sdpa_backward_flop)
    return FlopCounterMode(display=False, custom_mapping=cpu)


def step_flops(workload: str, steps: int, warmup: int, overrides: list[str]) -> float:
    """Matrix-product FLOPs of the timed steps (after ``warmup``) of our loop's batches for this config."""
    from accelerate import Accelerator

    from deltatune.train.loop import _epoch_loader
    from deltatune.train.run import build_job

    cfg = build_config(workload, steps, extra=tuple(overrides))
    job, _, _ = build_job(cfg, None)
    job.model.train()
    total = 0
    for i, batch in enumerate(_epoch_loader(job, 0, Accelerator())):
        if i >= steps:
            break
        if i < warmup:
            continue
        counter = _flop_counter()
        with counter:
            loss, count = job.task.loss(job.model, batch)
            (loss / max(count, 1)).backward()
        job.model.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
    return float(total)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    lines = [json.loads(line) for line in args.results.read_text(encoding="utf-8").splitlines() if line.strip()]
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16),
             "threads": torch.get_num_threads()}
    print(json.dumps({"peaks": peaks}), flush=True)
    report = {"peaks": peaks, "results": str(args.results), "workloads": []}
    for line in lines:
        steps, warmup = line["ours"]["steps"], line["warmup_steps"]
        row = {"workload": line["workload"], "ours_overrides": line["ours_overrides"]}
        for side, overrides in (("ours", line["ours_overrides"]), ("baseline", TRAINER_LIKE)):
            flops = step_flops(line["workload"], steps, warmup, overrides)
            seconds = line[side]["s_per_step"] * line[side]["timed_steps"]
            dtype = "bf16" if line[side]["bf16"] else "fp32"
            achieved = flops / seconds / 1e9
            row[side] = {"gflop_per_step": flops / 1e9 / line[side]["timed_steps"], "gflops": achieved,
                         "of_fp32_peak": achieved / peaks["fp32"]["gflops"],
                         "of_bf16_peak": achieved / peaks["bf16"]["gflops"], "dtype": dtype}
        report["workloads"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        from deltatune.fs import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
