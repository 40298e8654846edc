"""How close `deltatune plan` comes to real runs: predicted vs measured peak RSS and seconds per step.

    python benchmarks/plan_accuracy.py [--steps 8] [--only NAME ...] [--measure-only | --predict-only]
    python benchmarks/plan_accuracy.py --saved CONFIG [key=value ...]       # calibration, see plan.py
    python benchmarks/plan_accuracy.py --efficiency CONFIG [key=value ...]  # calibration, see plan.py

Each case trains for a few steps in its own process (`deltatune train`, so peak RSS is that
process's own ru_maxrss, loading and evaluation included) and is planned in this process for the
same config and the same steps. Seconds per step is the median over the steps after the first
(from log.jsonl: cumulative tokens / tokens_per_s gives the time at each step). Prints a table
with the ratios predicted / measured and writes benchmarks/results/plan_accuracy.json.
The goal is every ratio within 0.75 - 1.25. Timings on a shared machine drift: rerun the
timing side when a ratio is off and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.progress=false", "train.warmup_ratio=0", "data.eval_limit=32", "eval.forgetting=false"]
MINILM = ["data.train_limit=1024", "train.batch_size=32", "train.max_length=128", "train.eval_batch_size=32"]
SMOL = ["data.pack=true", "train.batch_size=4", "train.max_length=512", "train.eval_batch_size=4"]
CONFIGS = ROOT / "configs"
# The first four are the calibration runs named in plan.py; the others were not used to fit anything.
CASES = {
    "minilm-full-b32-l128": [str(CONFIGS / "minilm/classification-full.yaml"), *MINILM],
    "minilm-lora-b32-l128": [str(CONFIGS / "minilm/classification-lora.yaml"), *MINILM],
    "smollm2-lora-b4-l512": [str(CONFIGS / "smollm2-135m/causal_lm-lora.yaml"), *SMOL],
    "smollm2-lora-b4-l512-ckpt": [str(CONFIGS / "smollm2-135m/causal_lm-lora.yaml"), *SMOL,
                                  "train.gradient_checkpointing=true"],
    "minilm-lora-b32-l128-ckpt": [str(CONFIGS / "minilm/classification-lora.yaml"), *MINILM,
                                  "train.gradient_checkpointing=true"],
    "smollm2-lora-b4-l512-plainloss": [str(CONFIGS / "smollm2-135m/causal_lm-lora.yaml"), *SMOL,
                                       "train.chunked_loss=false"],
    "smollm2-full-b2-l256": [str(CONFIGS / "smollm2-135m/causal_lm-full.yaml"), *SMOL, "train.batch_size=2",
                             "train.max_length=256", "train.eval_batch_size=2"],
    # held out of the 2026-12-02 calibration (tcmalloc's memory factors, the AMD CPU's efficiencies)
    "minilm-full-b64-l128": [str(CONFIGS / "minilm/classification-full.yaml"), *MINILM, "train.batch_size=64"],
    "smollm2-full-b4-l128": [str(CONFIGS / "smollm2-135m/causal_lm-full.yaml"), *SMOL, "train.max_length=128"],
}


def measure(args: list[str], steps: int, workdir: Path) -> dict:
    out = workdir / f"run-{time.monotonic_ns()}"
    env = {**os.environ, "DELTATUNE_REGISTRY": str(workdir / "registry.sqlite")}
    cmd = [sys.executable, "-m", "deltatune.cli", "train", *args, *COMMON, f"train.max_steps={steps}",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    steps_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    clock = [r["tokens"] / r["tokens_per_s"] for r in steps_log if "loss" in r]
    per_step = [b - a for a, b in zip(clock, clock[1:])]  # the first step (warm-up) is left out
    return {"peak_rss_mb": metrics["peak_rss_mb"], "seconds_per_step": statistics.median(per_step)}


def predict(args: list[str], steps: int) -> dict:
    from deltatune.configure import load_config
    from deltatune.plan import plan

    config, overrides = args[0], args[1:]
    p = plan(load_config(config, [*overrides, *COMMON, f"train.max_steps={steps}"]))
    return {"peak_rss_mb": p.peak_mb, "seconds_per_step": p.seconds_per_step}


def saved_floats(config: str, overrides: list[str]) -> None:
    """Floats saved for backward per token per layer / hidden size, counted exactly with
    saved_tensors_hooks (unique storages, parameters excluded) at two lengths: the part that grows
    with the length is attention probabilities (ATTENTION_PROB_FLOATS), the rest ACTIVATION_FLOATS.
    Under bf16 autocast (where train.bf16 turns it on) bytes are counted as 4-byte floats."""
    from contextlib import nullcontext

    import torch

    from deltatune.configure import load_config
    from deltatune.eval.evaluate import forward_loss
    from deltatune.models import transformer_layers
    from deltatune.train.precision import bf16_enabled
    from deltatune.train.run import build_job

    cfg = load_config(config, overrides)
    job, _, _ = build_job(cfg, None)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_enabled(cfg.train.bf16, torch.device("cpu")) \
        else nullcontext()
    model, layers = job.model.train(), len(transformer_layers(job.model))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for width in (64, 128, 256):
        seen = {}

        def keep(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(5, 1000, (2, width))
        mask = torch.ones_like(ids)
        mask[0, -5:] = 0  # padding, as real batches have
        targets = ids if job.task.head == "causal" else torch.zeros(2, dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
            forward_loss(model, {"input_ids": ids, "attention_mask": mask}, targets, job.task)
        saved = sum(v for k, v in seen.items() if k not in params)
        print(f"width {width}: {saved / 4 / (2 * width) / layers / model.config.hidden_size:.2f} floats per token "
              "per layer, in units of the hidden size")


def efficiency(config: str, overrides: list[str], steps: int = 4) -> None:
    """Step FLOPs (plan.step_flops) / (matmul GFLOP/s measured just before x the step's seconds), in the
    precision train.bf16 gives the run (bf16 products and autocast where it turns on)."""
    from contextlib import nullcontext

    import torch
    from accelerate import Accelerator

    from deltatune.assets import resolve_model
    from deltatune.configure import load_config
    from deltatune.plan import Batches, matmul_gflops, model_shape, step_flops
    from deltatune.train.loop import _epoch_loader, adamw
    from deltatune.train.precision import bf16_enabled
    from deltatune.train.run import build_job

    cfg = load_config(config, overrides)
    bf16 = bf16_enabled(cfg.train.bf16, torch.device("cpu"))
    job, data, _ = build_job(cfg, None)
    shape = model_shape(resolve_model(cfg.model), job.task, cfg.method.name, cfg.method.options)
    optimizer = adamw([p for p in job.model.parameters() if p.requires_grad], lr=1e-5)  # the loop's
    job.model.train()
    for _, batch in zip(range(steps), _epoch_loader(job, 0, Accelerator())):
        speed = matmul_gflops(shape.hidden, cfg.train.batch_size * 128, 0.5, torch.bfloat16 if bf16 else torch.float32)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss, count = job.task.loss(job.model, batch)
        (loss / max(count, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        width = batch["inputs"]["input_ids"].shape[1]
        predicted = int((batch["targets"][:, 1:] != -100).sum()) if job.task.head == "causal" else 0
        flops = step_flops(shape, Batches(cfg.train.batch_size, [width], [predicted], 0), cfg.train, job.task)
        print(f"width {width}: {seconds:.2f} s, {flops / 1e9:.1f} GFLOP at {speed:.1f} GFLOP/s: "
              f"efficiency {flops / 1e9 / speed / seconds:.3f}")


def main() -> None:
    if sys.argv[1:2] in (["--saved"], ["--efficiency"]):
        (saved_floats if sys.argv[1] == "--saved" else efficiency)(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--measure-only", action="store_true", help="print measurements, plan nothing")
    parser.add_argument("--predict-only", action="store_true",
                        help="plan again against the measurements in the results file (after changing a constant)")
    args = parser.parse_args()
    names = args.only or list(CASES)
    results = {}
    out = ROOT / "benchmarks" / "results" / "plan_accuracy.json"
    if args.predict_only:
        earlier = json.loads(out.read_text())
        args.steps = earlier["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = {"measured": earlier["cases"][name]["measured"] if args.predict_only else
                   measure(CASES[name], args.steps, Path(tmp))}
            if not args.measure_only:
                row["predicted"] = predict(CASES[name], args.steps)
                row["ratio"] = {k: round(row["predicted"][k] / row["measured"][k], 3) for k in row["measured"]}
            results[name] = row
            print(name, json.dumps(row), flush=True)
    if not args.measure_only:
        print(f"\n{'case':34} {'RSS MB pred/meas':>22} {'ratio':>6} {'s/step pred/meas':>20} {'ratio':>6}")
        for name, r in results.items():
            p, m, q = r["predicted"], r["measured"], r["ratio"]
            print(f"{name:34} {p['peak_rss_mb']:>10.0f} / {m['peak_rss_mb']:<9.0f} {q['peak_rss_mb']:>6.2f} "
                  f"{p['seconds_per_step']:>8.3f} / {m['seconds_per_step']:<9.3f} {q['seconds_per_step']:>6.2f}")
        ok = all(0.75 <= v <= 1.25 for r in results.values() for v in r["ratio"].values())
        print("all within 25%" if ok else "NOT all within 25%")
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"steps": args.steps, "threads": _threads(), "cases": results}, indent=1) + "\n")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
