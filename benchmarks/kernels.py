"""Each of deltatune's fused paths alone: a training step's time and its peak memory, with and without it.

    python benchmarks/kernels.py [--workload smollm2-lora,minilm-cls-lora] [--steps 3] [--rounds 2] [--out FILE]

For each workload (benchmarks/bench_common.py) and each setting below, a process of its own builds the job
as ``deltatune train`` does and times forward + backward on the workload's longest batch (the same batch
every time, so settings compare like for like); the first step is a warm-up. "system" runs on the C library's
malloc, "tcmalloc" as ``deltatune train`` starts itself (deltatune/allocator.py). Peak memory is the process's
VmHWM over the timed steps only (reset after loading): what the step adds to a loaded model. The settings
run in turn, round after round (interleaved); medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ALL = "[rms_norm,swiglu,shared_lora_dropout]"
SETTINGS = {  # name: (overrides, malloc)
    "none": (("train.kernels=[]",), "system"),
    "rms_norm": (("train.kernels=[rms_norm]",), "system"),
    "swiglu": (("train.kernels=[swiglu]",), "system"),
    "lora_dropout": (("train.kernels=[lora_dropout]",), "system"),
    "shared_lora_dropout": (("train.kernels=[shared_lora_dropout]",), "system"),
    "return_freed_memory": (("train.kernels=[]", "train.return_freed_memory=true"), "system"),
    "tcmalloc": (("train.kernels=[]",), "tcmalloc"),
    "defaults (rms_norm, swiglu, lora_dropout; tcmalloc)": ((), "tcmalloc"),
    "defaults, shared_lora_dropout for lora_dropout": ((f"train.kernels={ALL}",), "tcmalloc"),
}


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def worker(workload: str, overrides: list[str], steps: int) -> dict:
    from bench_common import build_config
    from deltatune.train.run import build_job

    cfg = build_config(workload, 2, extra=tuple(overrides))
    job, _, _ = build_job(cfg, None)
    model = job.model
    model.train()
    examples = sorted(job.train_examples, key=job.task.length)[-cfg.train.batch_size:]
    batch = job.task.collate(examples)
    loaded = _status("VmRSS")
    times = []
    for i in range(steps + 1):
        if i == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # peak RSS from here
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = job.task.loss(model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
        del loss
    return {"s_per_step": statistics.median(times[1:]), "loaded_mb": loaded, "peak_mb": _status("VmHWM"),
            "tokens": int(sum(job.task.length(e) for e in examples))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="smollm2-lora,minilm-cls-lora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1:], args.steps)))
        return
    from deltatune import allocator

    rows = []
    for workload in args.workload.split(","):
        runs = {name: [] for name in SETTINGS}
        for r in range(args.rounds):
            for name, (overrides, malloc) in SETTINGS.items():
                env = allocator.child_environment(malloc) or sys.exit("tcmalloc is not on this machine")
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", workload,
                                      *overrides], capture_output=True, text=True, check=True,
                                     cwd=Path(__file__).parent, env=env)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {workload} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
        base = statistics.median(x["s_per_step"] for x in runs["none"])
        base_peak = statistics.median(x["peak_mb"] for x in runs["none"])
        for name, got in runs.items():
            s = statistics.median(x["s_per_step"] for x in got)
            peak = statistics.median(x["peak_mb"] for x in got)
            rows.append({"workload": workload, "setting": name, "overrides": list(SETTINGS[name][0]),
                         "malloc": SETTINGS[name][1],
                         "s_per_step": round(s, 4), "speedup_vs_none": round(base / s, 3), "peak_mb": round(peak),
                         "peak_vs_none": round(peak / base_peak, 3), "rounds": got})
            print(f"{workload:16} {name:50} {s:7.3f} s/step  x{base / s:5.2f}  peak {peak:6.0f} MB  "
                  f"x{peak / base_peak:5.2f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
