"""`deltatune export --format onnx`: MiniLM classification in onnxruntime (fp32, int8) against PyTorch eager.

    python benchmarks/export_onnx.py [--steps 60] [--reps 5] [--single 40] [--batches 6]
                                     [--out benchmarks/results/export_onnx.json]

Set-up (once, cached under $DELTATUNE_CACHE/bench-export): a LoRA run of MiniLM (all-MiniLM-L6-v2) on the
packaged Pang & Lee sentences (configs/minilm/classification-lora.yaml, ``--steps`` steps), exported as
onnx fp32 and int8 (each export's own parity check on the run's evaluation split is reported).

Every backend classifies the same Pang & Lee sentences, already tokenized, through the same call
(``class_probabilities``: pad, forward, softmax), under ``torch.inference_mode``:
- ``pytorch_run``: the run's model as ``deltatune predict RUN`` loads it (base + unmerged LoRA, peft);
- ``pytorch_merged``: the same with the LoRA folded in (``--format hf``'s model), the fairer eager baseline;
- ``onnxruntime_fp32`` / ``onnxruntime_int8``: the exports, through ``deltatune predict EXPORT``'s wrapper.
Latency at batch 1 (``--single`` texts, one call each) and batch 32 (``--batches`` batches), repetitions
interleaved backend by backend, medians over every call; throughput = 32 texts / median batch-32 latency.
torch and onnxruntime each use their default threads (every core of the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32


def _run(folder: Path, steps: int) -> Path:
    """The MiniLM LoRA run (trained once, reused while its step count is the same)."""
    from deltatune.configure import load_config
    from deltatune.train.run import train

    out = folder / f"minilm-cls-{steps}"
    if not (out / "metrics.json").is_file():
        print(f"training {out.name} ...", file=sys.stderr)
        train(load_config(ROOT / "configs/minilm/classification-lora.yaml",
                          [f"train.max_steps={steps}", f"train.eval_every={steps}", "train.progress=false",
                           "eval.forgetting=false", f"output_dir={out}"]))
    return out


def _exports(run: Path, folder: Path) -> dict[str, Path]:
    from deltatune.export import export

    out = {}
    for quantize in ("fp32", "int8"):
        target = folder / f"{run.name}-onnx-{quantize}"
        start = time.perf_counter()
        out[quantize] = export(run, target, fmt="onnx", quantize=quantize, force=target.exists())
        print(f"exported {quantize} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def _sentences(n: int) -> list[str]:
    from deltatune.assets import resolve_data

    with open(resolve_data("pang-lee-sentences"), newline="", encoding="utf-8") as fh:
        return [row["text"] for _, row in zip(range(n), csv.DictReader(fh))]


def _backends(run: Path, exports: dict[str, Path]) -> dict:
    from deltatune.export.load import load_export
    from deltatune.inference import load_run, read_run, tuned_model

    parts = read_run(run)
    return {"pytorch_run": load_run(run).model,
            "pytorch_merged": parts.method.merge(tuned_model(parts)).eval(),
            "onnxruntime_fp32": load_export(exports["fp32"]).model,
            "onnxruntime_int8": load_export(exports["int8"]).model}


def _time(model, tokenizer, ids: list[list[int]]) -> float:
    import torch

    from deltatune.tasks.classification import class_probabilities

    with torch.inference_mode():
        start = time.perf_counter()
        class_probabilities(model, tokenizer, ids)
        return time.perf_counter() - start


def _latencies(models: dict, tokenizer, texts: list[str], single: int, batches: int, reps: int) -> dict:
    ids = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    ones, groups = ids[:single], [ids[single + i * BATCH: single + (i + 1) * BATCH] for i in range(batches)]
    samples = {name: {"batch_1": [], f"batch_{BATCH}": []} for name in models}
    for name, model in models.items():  # warm-up: first calls allocate and pick kernels
        _time(model, tokenizer, groups[0])
    for rep in range(reps):
        for name, model in models.items():
            samples[name]["batch_1"] += [_time(model, tokenizer, [x]) for x in ones]
            samples[name][f"batch_{BATCH}"] += [_time(model, tokenizer, g) for g in groups]
        print(f"repetition {rep + 1}/{reps} done", file=sys.stderr)
    out = {}
    for name, got in samples.items():
        one, many = statistics.median(got["batch_1"]), statistics.median(got[f"batch_{BATCH}"])
        out[name] = {"batch_1_ms": round(1000 * one, 2), f"batch_{BATCH}_ms": round(1000 * many, 2),
                     "texts_per_s": round(BATCH / many, 1), "calls": len(got["batch_1"]) + len(got[f"batch_{BATCH}"])}
    return out


def _mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 2)


def run_onnx(args) -> dict:
    """Train (or reuse) the run, export it twice, time the four backends; the figures as a dict."""
    import onnxruntime
    import torch

    from deltatune.fs import cache_dir
    from deltatune.models import load_tokenizer

    folder = cache_dir() / "bench-export"
    run = _run(folder, args.steps)
    exports = _exports(run, folder)
    manifests = {q: json.loads((p / "export.json").read_text()) for q, p in exports.items()}
    models = _backends(run, exports)
    tokenizer = load_tokenizer(run / "tokenizer")
    texts = _sentences(args.single + args.batches * BATCH)
    speed = _latencies(models, tokenizer, texts, args.single, args.batches, args.reps)
    eager = speed["pytorch_run"]
    merged_params = sum(p.numel() * p.element_size() for p in models["pytorch_merged"].parameters())
    return {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "torch_threads": torch.get_num_threads()},
        "run": {"path": str(run), "steps": args.steps,
                "eval": json.loads((run / "metrics.json").read_text())["eval"]},
        "parity": {q: m["check"] for q, m in manifests.items()},
        "sizes_mb": {"onnx_fp32": _mb(exports["fp32"] / "model.onnx"),
                     "onnx_int8": _mb(exports["int8"] / "model.onnx"),
                     "pytorch_merged_fp32_parameters": round(merged_params / 2**20, 2)},
        "texts": {"source": "pang-lee-sentences", "batch_1_texts": args.single, f"batch_{BATCH}_batches": args.batches,
                  "repetitions": args.reps},
        "latency": speed,
        "speedup_over_pytorch_run": {name: {k: round(eager[k] / v[k], 2) for k in ("batch_1_ms", f"batch_{BATCH}_ms")}
                                     for name, v in speed.items() if name != "pytorch_run"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps of the MiniLM LoRA run")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--single", type=int, default=40, help="texts timed one at a time per repetition")
    ap.add_argument("--batches", type=int, default=6, help=f"batches of {BATCH} timed per repetition")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/export_onnx.json"))
    args = ap.parse_args()
    result = run_onnx(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
