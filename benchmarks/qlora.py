"""QLoRA (4-bit NF4 base) against LoRA on the fp32 base, SmolLM2-135M, same data and budget.

    python benchmarks/qlora.py [--steps 10] [--rounds 2]

Each side trains in its own process (so peak RSS is its own), alternating LoRA, QLoRA, LoRA,
QLoRA, ... to spread the machine's drift over both; medians are reported, plus the ratio
QLoRA / LoRA. Prints one JSON line and writes benchmarks/results/qlora.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ["data.train_limit=200", "data.eval_limit=16", "train.batch_size=4", "train.max_length=128",
          "train.eval_every=0", "train.progress=false", "train.warmup_ratio=0"]


def weights_mb(method: str) -> float:
    """Bytes the model's parameters and buffers take once loaded for this method (a separate process)."""
    code = (
        "import sys; from deltatune.methods import registry; from deltatune.models import load_model;"
        f"m = registry.get('{method}'); opts = m.Options();"
        "model = load_model('smollm2-135m', 'causal', **m.load_kwargs(opts));"
        "print(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())) / 2**20)")
    return round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout.split()[-1]), 1)


def run(method: str, steps: int, workdir: Path) -> dict:
    out = workdir / f"{method}-{time.monotonic_ns()}"
    config = ROOT / "configs" / "smollm2-135m" / f"causal_lm-{method}.yaml"
    cmd = [sys.executable, "-m", "deltatune.cli", "train", str(config), *BUDGET, f"train.max_steps={steps}",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed: {proc.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"seconds_per_step": m["train_seconds"] / m["steps"], "tokens_per_s": m["tokens_per_s"],
            "peak_rss_mb": m["peak_rss_mb"], "final_eval_loss": m["eval"]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"lora": [], "qlora": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for method in runs:
                runs[method].append(run(method, args.steps, Path(tmp)))
    result = {"workload": "smollm2-135m causal_lm, r=16 q/k/v/o, batch 4 x <=128 tokens",
              "steps": args.steps, "rounds": args.rounds, "date": time.strftime("%Y-%m-%d")}
    for method, rows in runs.items():
        result[method] = {key: round(statistics.median(r[key] for r in rows), 4) for key in rows[0]}
        result[method]["weights_mb"] = weights_mb(method)
        result[method]["all_seconds_per_step"] = [round(r["seconds_per_step"], 3) for r in rows]
    for key in ("seconds_per_step", "peak_rss_mb", "weights_mb"):
        result[f"{key}_ratio_qlora_over_lora"] = round(result["qlora"][key] / result["lora"][key], 3)
    print(json.dumps(result))
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "qlora.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
