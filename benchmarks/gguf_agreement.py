"""Top-1 agreement of quantized GGUF exports (q8_0, q4_k_m) with the run in transformers, measured on
more positions and a longer-trained run than the export check uses.

    python benchmarks/gguf_agreement.py [--steps 150] [--prompts 60] [--new-tokens 48]
                                        [--out benchmarks/results/gguf_agreement.json]

Set-up (once, cached under $DELTATUNE_CACHE/bench-export/smollm2-lora-<steps>): a LoRA run of SmolLM2-135M
on chatterbot (configs/smollm2-135m/causal_lm-lora.yaml) for --steps steps, exported merged in f16, q8_0
and q4_k_m (`deltatune export --format gguf`, its own check skipped here because this script measures it).

For each file, `export.gguf.parity` runs with --prompts prompts and --new-tokens new tokens: llama.cpp
teacher-forced on transformers' greedy tokens, top-1 agreement over all generated positions, over the
positions where the run is decided (its token leads by >= NEAR_TIE logits), the near-ties, and the
greedy generations that came out equal. The thresholds are switched off so that the figures are reported
whatever they are. f16 is the control: its rounding is far smaller than quantization's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

QUANTS = ("f16", "q8_0", "q4_k_m")


def _run(folder: Path, steps: int) -> Path:
    from deltatune.configure import load_config
    from deltatune.train.run import train

    out = folder / f"smollm2-lora-{steps}"
    if not (out / "metrics.json").is_file():
        print(f"training the SmolLM2 LoRA run for {steps} steps ...", file=sys.stderr)
        train(load_config(ROOT / "configs/smollm2-135m/causal_lm-lora.yaml",
                          [f"train.max_steps={steps}", "train.epochs=100", "train.progress=false",
                           "eval.forgetting=false", "data.eval_limit=60", f"train.eval_every={steps}",
                           f"output_dir={out}"]))
    return out


def measure(args) -> dict:
    from deltatune.export import export, gguf
    from deltatune.fs import cache_dir
    from deltatune.inference import read_run

    folder = cache_dir() / "bench-export"
    run = _run(folder, args.steps)
    metrics = json.loads((run / "metrics.json").read_text())
    parts = read_run(run)
    gguf.CHECK_PROMPTS, gguf.CHECK_NEW_TOKENS = args.prompts, args.new_tokens
    gguf.AGREEMENT = {q: 0.0 for q in gguf.AGREEMENT}  # report, do not gate
    gguf.LOGIT_TOLERANCE = {q: float("inf") for q in gguf.LOGIT_TOLERANCE}
    figures = {}
    for quant in QUANTS:
        started = time.perf_counter()
        out = export(run, folder / f"agreement-{args.steps}-{quant}", fmt="gguf", quantize=quant, force=True,
                     check=False)
        figures[quant] = gguf.parity(parts, out / gguf.model_file(quant), None, quant)
        print(f"{quant}: {figures[quant]} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {
        "model": f"SmolLM2-135M-Instruct + LoRA (r 16 on q/k/v/o, {metrics['steps']} steps on chatterbot)",
        "run": str(run), "eval_perplexity": round(metrics["eval"]["perplexity"], 2),
        "baseline_perplexity": round(metrics["baseline"]["perplexity"], 2),
        "prompts": args.prompts, "new_tokens": args.new_tokens, "near_tie": gguf.NEAR_TIE,
        "load_average_at_end": os.getloadavg()[0], "parity": figures,
    }


def main() -> None:
    from bench_common import run_and_write

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=48)
    run_and_write(parser, measure, "gguf_agreement")


if __name__ == "__main__":
    main()
