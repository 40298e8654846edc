"""deltatune's training loop against transformers Trainer + peft, on identical work.

    python benchmarks/run.py [--workload smollm2-lora,minilm-cls-full,minilm-cls-lora] [--steps N]
                             [--warmup W] [--rounds R] [--ours-override key=value ...] [--out FILE]

For each workload both sides train the same model on the same prepared examples, in the same order,
with the same hyper-parameters and seed, for W untimed + N timed steps (see bench_common.py for
what exactly is matched and timed). Each side runs in its own process, so its peak RSS is its own,
alternating baseline, ours, baseline, ours, ... for R rounds to spread the machine's drift (2-core
machines whose timings vary 10-38% from run to run) over both sides. One JSON line per workload:
each side's medians and raw per-round values, and the medians of the per-round ratios ``speedup``
(ours/baseline useful tokens/s) and ``memory_ratio`` (ours/baseline peak RSS).

``--ours-override`` changes our side only (e.g. data.pack=true, train.bf16=true,
train.gradient_checkpointing=true), so each optimisation can be measured alone. Our side runs on the malloc
``deltatune train`` runs on (tcmalloc when the machine has it: deltatune/allocator.py), the Trainer on the C
library's; ``--allocator`` puts both sides on one of them, to tell the allocator's share from the rest. Our side
trains in bf16 where ``train.bf16=auto`` measures bf16 products at least twice as fast as fp32 (``machine``'s
``bf16_product_speedup``; deltatune/train/precision.py); ``--baseline-bf16`` gives the Trainer ``bf16=True``
too, for the same-precision ratio. ``--model`` and ``--train`` replace the model and data of every selected
workload (the smoke test's tiny models).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench_common import WORKLOADS, build_config
from deltatune import allocator

SIDES = ("baseline", "ours")
SUMMARY_KEYS = ("tokens_per_s", "s_per_step", "wall_s_per_step", "peak_rss_mb", "cpu_util", "final_loss")
SAME_KEYS = ("rows_seen", "tokens_seen", "train_rows", "fingerprint", "trainable_params", "optimizer", "bf16",
             "threads", "steps", "timed_steps", "chunked_loss", "gradient_checkpointing", "pack", "allocator")  # same every round


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default=",".join(WORKLOADS), help=f"comma-separated: {', '.join(WORKLOADS)}")
    p.add_argument("--steps", type=int, help="timed steps per run (default: the workload's)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--rounds", type=int, default=2, help="baseline/ours pairs per workload (default 2)")
    p.add_argument("--ours-override", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", help="replace every selected workload's model (a local HF folder)")
    p.add_argument("--train", help="replace every selected workload's data (train and the 4 eval rows)")
    p.add_argument("--out", help="also write the JSON lines to this file")
    p.add_argument("--allocator", choices=("tcmalloc", "system"),
                   help="both sides on this malloc (default: ours on deltatune's, the Trainer on the system's)")
    p.add_argument("--baseline-bf16", action="store_true",
                   help="the Trainer with bf16=True (autocast), as ours runs where train.bf16=auto turns it on")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)    # worker mode: one measurement
    p.add_argument("--result", help=argparse.SUPPRESS)                # worker mode: where it goes
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if args.warmup < 1 or args.rounds < 1 or (args.steps is not None and args.steps < 1):
        p.error("--warmup, --rounds and --steps must be at least 1")
    return args


def side_config(args: argparse.Namespace, workload: str, side: str):
    steps = args.steps or WORKLOADS[workload].steps
    extra = tuple(args.ours_override) if side == "ours" else ()
    return build_config(workload, args.warmup + steps, args.model, args.train, extra)


def worker(args: argparse.Namespace) -> None:
    """One side, one workload, one measurement, written as JSON to --result."""
    cfg = side_config(args, args.workloads[0], args.side)
    with tempfile.TemporaryDirectory() as tmp:
        if args.side == "ours":
            from bench_ours import measure
            result = measure(cfg, args.warmup, Path(tmp))
        else:
            from bench_baseline import measure
            result = measure(cfg, args.warmup, Path(tmp), bf16=args.baseline_bf16)
    result["allocator"] = allocator.active()
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def run_side(args: argparse.Namespace, workload: str, side: str, workdir: Path) -> dict:
    result = workdir / f"{side}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--workload", workload,
           "--warmup", str(args.warmup), "--result", str(result)]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--train", args.train] if args.train else []
    cmd += ["--ours-override", *args.ours_override] if args.ours_override else []
    cmd += ["--baseline-bf16"] if args.baseline_bf16 else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    malloc = args.allocator or ("tcmalloc" if side == "ours" else "system")  # ours as `deltatune train` starts
    env = allocator.child_environment(malloc, env) or allocator.child_environment("system", env)
    started, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"{workload}: the {side} side failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(result.read_text(encoding="utf-8")), "started": started,
            "process_wall_s": time.perf_counter() - start}


def median_ratio(top: list[dict], bottom: list[dict], key: str) -> float:
    return statistics.median(a[key] / b[key] for a, b in zip(top, bottom))


def side_summary(rows: list[dict]) -> dict:
    out = {key: statistics.median(r[key] for r in rows) for key in SUMMARY_KEYS}
    out.update({key: rows[0][key] for key in SAME_KEYS if key in rows[0]})
    raw = (*SUMMARY_KEYS, "first_loss", "started", "process_wall_s", "order_verified")
    out["runs"] = [{key: r[key] for key in raw} for r in rows]
    return out


def compare(name: str, runs: dict[str, list[dict]], args: argparse.Namespace, machine: dict) -> dict:
    ours, base = runs["ours"], runs["baseline"]
    every = ours + base
    same_examples = (len({r["fingerprint"] for r in every}) == 1 and len({r["rows_seen"] for r in every}) == 1
                     and all(r["order_verified"] for r in every))
    same_init = (len({r["trainable_params"] for r in every}) == 1
                 and max(r["init_checksum"] for r in every) - min(r["init_checksum"] for r in every)
                 <= 1e-6 * max(1.0, abs(every[0]["init_checksum"])))
    base_loss = statistics.median(r["final_loss"] for r in base)
    return {
        "workload": name, "description": WORKLOADS[name].description,
        "steps": ours[0]["timed_steps"], "warmup_steps": args.warmup, "rounds": args.rounds,
        "order": [side for _ in range(args.rounds) for side in SIDES],
        "ours_overrides": args.ours_override, "allocator_option": args.allocator, "baseline_bf16": args.baseline_bf16,
        "model": args.model, "train": args.train,
        "speedup": median_ratio(ours, base, "tokens_per_s"),
        "memory_ratio": median_ratio(ours, base, "peak_rss_mb"),
        "loss_rel_diff": abs(statistics.median(r["final_loss"] for r in ours) - base_loss) / abs(base_loss),
        "first_loss_rel_diff": abs(ours[0]["first_loss"] - base[0]["first_loss"]) / abs(base[0]["first_loss"]),
        "same_examples": same_examples, "same_init": same_init,
        "ours": side_summary(ours), "baseline": side_summary(base),
        "timing": (f"useful (non-padding) tokens / summed step time over steps {args.warmup + 1}.."
                   f"{ours[0]['steps']}; a step = forward, backward, clipping, optimizer, scheduler "
                   "(no data loading, logging or evaluation); cpu_util = process CPU time / (wall x threads) "
                   "from the end of the warm-up to the end of the last step"),
        "machine": {**machine, "loadavg_1min_end": round(os.getloadavg()[0], 2)},
    }


def machine_facts() -> dict:
    from deltatune.train import precision

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    lines = cpuinfo.splitlines()
    field = lambda name: next((line.split(":", 1)[1] for line in lines if line.startswith(name)), "")  # noqa: E731
    model, flags = field("model name").strip() or platform.processor(), set(field("flags").split())
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "bf16_product_speedup": round(precision.cpu_bf16_speedup(), 2),
            "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "accelerate")},
            "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_1min_start": round(os.getloadavg()[0], 2)}


def benchmark(args: argparse.Namespace) -> list[dict]:
    for name in args.workloads:  # a bad override or workload fails here, before any run
        for side in SIDES:
            side_config(args, name, side)
    lines = []
    for name in args.workloads:
        machine = machine_facts()
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                for side in SIDES:
                    workdir = Path(tmp) / f"{side}-{round_}"
                    workdir.mkdir()
                    runs[side].append(run_side(args, name, side, workdir))
        lines.append(compare(name, runs, args, machine))
        print(json.dumps(lines[-1]), flush=True)
        if args.out:
            from deltatune.fs import atomic_write_text

            atomic_write_text(Path(args.out), "".join(json.dumps(line) + "\n" for line in lines))
    return lines


def main() -> None:
    from deltatune.errors import DeltatuneError

    args = parse()
    try:
        worker(args) if args.side else benchmark(args)
    except DeltatuneError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
