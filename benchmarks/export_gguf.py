"""GGUF exports of a SmolLM2-135M LoRA run in llama.cpp against the run in transformers.

    python benchmarks/export_gguf.py [--rounds 5] [--new-tokens 64] [--out benchmarks/results/export_gguf.json]

Set-up (once, cached under $DELTATUNE_CACHE/bench-export/smollm2-lora-gguf): a LoRA run of SmolLM2-135M on
chatterbot, a few steps (configs/smollm2-135m/causal_lm-lora.yaml).

- parity: `deltatune export` in f16, q8_0, q4_k_m and gguf-lora with its check (the run's 20 prompts,
  llama.cpp against transformers); the check's figures as export.json records them.
- size: each GGUF file, against the merged model's fp32 safetensors.
- speed: greedy generation of exactly --new-tokens tokens (the end-of-turn token does not stop it, so that
  every side generates the same number) after each of the same 20 prompts, one prompt at a time: llama.cpp
  (f16, q8_0, q4_k_m; opened as `deltatune predict` opens it) against transformers `generate` on the merged
  model (fp32, the run's own precision). The sides take turns, round after round; the median of the rounds'
  tokens/s is reported, with the ratio to transformers. Both use torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

QUANTS = ("f16", "q8_0", "q4_k_m")


def _run(folder: Path) -> Path:
    from deltatune.configure import load_config
    from deltatune.train.run import train

    out = folder / "smollm2-lora-gguf"
    if not (out / "metrics.json").is_file():
        print("training the SmolLM2 LoRA run ...", file=sys.stderr)
        train(load_config(ROOT / "configs/smollm2-135m/causal_lm-lora.yaml",
                          ["train.max_steps=6", "train.progress=false", "eval.forgetting=false", "data.eval_limit=40",
                           "data.train_limit=200", "train.eval_every=6", f"output_dir={out}"]))
    return out


def _exports(run: Path, folder: Path) -> dict[str, Path]:
    from deltatune.export import export

    out = {}
    for name in (*QUANTS, "lora"):
        started = time.perf_counter()
        fmt, quant = ("gguf-lora", None) if name == "lora" else ("gguf", name)
        out[name] = export(run, folder / f"gguf-{name}", fmt=fmt, quantize=quant, force=True)
        print(f"exported {name} with its check in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return out


def _transformers_side(model, prompts: list[list[int]], new_tokens: int):
    import torch

    @torch.no_grad()
    def generate() -> int:
        made = 0
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            made += out.shape[1] - len(ids)
        return made
    return generate


def _llama_side(llm, prompts: list[list[int]], new_tokens: int):
    from deltatune.export import llamacpp

    def generate() -> int:
        return sum(len(llamacpp.greedy(llm, ids, new_tokens, eos_id=-1)) for ids in prompts)
    return generate


def run_gguf(args) -> dict:
    import torch

    from deltatune.data.examples import prompt_ids
    from deltatune.export import MANIFEST, gguf, llamacpp
    from deltatune.fs import cache_dir
    from deltatune.inference import read_run, tuned_model

    folder = cache_dir() / "bench-export"
    run = _run(folder)
    exports = _exports(run, folder)
    parts = read_run(run)
    texts, source = gguf.check_prompts(parts)
    prompts = [prompt_ids(parts.tokenizer, t, parts.cfg.data.chat_template) for t in texts]
    merged = parts.method.merge(tuned_model(parts))
    fp32_bytes = sum(p.numel() * 4 for p in merged.parameters())

    sides = {"transformers": _transformers_side(merged, prompts, args.new_tokens)}
    models = {q: llamacpp.open_model(exports[q] / gguf.model_file(q), n_ctx=512) for q in QUANTS}
    sides.update({f"llama.cpp {q}": _llama_side(llm, prompts, args.new_tokens) for q, llm in models.items()})
    for generate in sides.values():  # warm-up: first calls allocate
        generate()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, generate in sides.items():
            started = time.perf_counter()
            made = generate()
            rates[name].append(made / (time.perf_counter() - started))
    speed = {name: round(statistics.median(r), 1) for name, r in rates.items()}
    for llm in models.values():
        llm.close()

    size = {q: (exports[q] / gguf.model_file(q)).stat().st_size for q in QUANTS}
    size["gguf-lora adapter"] = (exports["lora"] / "adapter.gguf").stat().st_size
    return {
        "model": "SmolLM2-135M-Instruct + LoRA (r 16 on q/k/v/o, 6 steps on chatterbot)",
        "run": str(run), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
        "prompts": f"{len(prompts)} from {source}", "new_tokens_per_prompt": args.new_tokens,
        "rounds": args.rounds,
        "parity": {name: json.loads((out / MANIFEST).read_text())["check"] for name, out in exports.items()},
        "size_bytes": {**size, "merged fp32 safetensors (parameters x 4 bytes)": fp32_bytes},
        "size_ratio_to_fp32": {q: round(size[q] / fp32_bytes, 3) for q in QUANTS},
        "tokens_per_s_median": speed,
        "tokens_per_s_per_round": {name: [round(r, 1) for r in v] for name, v in rates.items()},
        "speed_ratio_to_transformers": {name: round(v / speed["transformers"], 2) for name, v in speed.items()
                                        if name != "transformers"},
    }


def main() -> None:
    from bench_common import run_and_write

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    run_and_write(parser, run_gguf, "export_gguf")


if __name__ == "__main__":
    main()
