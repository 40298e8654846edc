"""Where a training step's time goes: torch.profiler over deltatune's loop on a benchmark workload.

    python benchmarks/profile_step.py --workload minilm-cls-full [--steps 3] [--ours-override k=v ...]
                                      [--rows 25] [--trace FILE.json]

Runs the workload's config (benchmarks/bench_common.py) through ``build_job`` + ``run_loop``; the first
step is a warm-up, the next ``--steps`` are profiled. Prints the operators by self CPU time (the share
of the profiled steps' time each takes) and the matrix products' achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from bench_common import WORKLOADS, build_config
from deltatune.rundir import RunDir
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job

MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", required=True, choices=list(WORKLOADS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ours-override", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", help="also write a Chrome trace here")
    args = p.parse_args()
    cfg = build_config(args.workload, 1 + args.steps, extra=tuple(args.ours_override))
    job, _, _ = build_job(cfg, None)
    captured = []
    with tempfile.TemporaryDirectory() as tmp, profile(
            activities=[ProfilerActivity.CPU], with_flops=True, on_trace_ready=captured.append,
            schedule=schedule(wait=0, warmup=1, active=args.steps, repeat=1)) as prof:
        job.run = RunDir(Path(tmp) / "run")
        job.run.path.mkdir(parents=True)
        run_loop(job, callbacks=(lambda state: prof.step(),))
    prof = captured[0]
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    products = [e for e in events if e.key in MATRIX_PRODUCTS]  # mul and add carry FLOPs too: not these
    flops = sum(e.flops for e in products)
    mm_time = sum(e.self_cpu_time_total for e in products)
    print(f"profiled {args.steps} steps, {total / 1e6:.2f} s of self CPU time; matrix products "
          f"{flops / 1e9:.0f} GFLOP in {mm_time / 1e6:.2f} s = {flops / max(mm_time, 1) / 1e3:.0f} GFLOP/s "
          f"({mm_time / total:.0%} of the time)")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
