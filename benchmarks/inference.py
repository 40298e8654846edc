"""Inference timed: deltatune's evaluation against a plain loop over the same examples, in one run.

    python benchmarks/inference.py [--job demo-eval,forgetting] [--rounds 3] [--out FILE]

Two jobs: the demo config's evaluation (configs/minilm/classification-lora.yaml: MiniLM with LoRA, its 800
held-out Pang & Lee sentences) and the forgetting meter (configs/smollm2-135m/causal_lm-lora.yaml: SmolLM2-135M
with LoRA scoring the 200 OANC sentences of eval.forgetting_rows). Sides, each in a process of its own:

- ``plain``: the loop one writes with transformers: the same model, examples and batch size
  (train.eval_batch_size), batches in the data's order padded to their longest row, ``model.eval()`` and
  ``torch.no_grad()``, the loss from the model's logits; the C library's malloc.
- ``deltatune-system``: ``Task.evaluate`` as ``train`` and ``eval`` run it (batches sorted by length, eval mode,
  no gradients, no dropout, the decoder's loss over the vocabulary in chunks); the C library's malloc.
- ``deltatune``: the same on the malloc the commands run on (tcmalloc, deltatune/allocator.py).

Both sides' losses must agree (to 1e-4 relative): the same numbers computed two ways. The model is the config's
base with its delta at the initial value (the timing does not depend on what the delta learned). Sides run in
turn, round after round; medians. Generation (``predict``, ``serve``) keeps its KV cache: benchmarks/serve.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "demo-eval": (ROOT / "configs/minilm/classification-lora.yaml", ()),
    "forgetting": (ROOT / "configs/smollm2-135m/causal_lm-lora.yaml", ("eval.forgetting_rows=200",)),
}
SIDES = ("plain", "deltatune-system", "deltatune")


def plain_loss(model, task, examples: list, causal: bool) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), task.cfg.train.eval_batch_size):
            batch = task.collate(examples[i:i + task.cfg.train.eval_batch_size])
            logits = model(**batch["inputs"]).logits
            if causal:
                logits, targets = logits[:, :-1].flatten(0, 1), batch["targets"][:, 1:].flatten()
            else:
                targets = batch["targets"]
            total += float(F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total, count


def worker(job: str, side: str) -> dict:
    from deltatune.allocator import active
    from deltatune.configure import load_config
    from deltatune.eval.extras import build_extras
    from deltatune.train.run import build_job

    path, extra = JOBS[job]
    cfg = load_config(str(path), ["train.progress=false", *extra])
    built, _, tokenizer = build_job(cfg, None)
    task, model = built.task, built.model
    examples = build_extras(cfg, task, tokenizer).general if job == "forgetting" else built.eval_examples
    causal = job == "forgetting"
    times, loss = [], None
    for _ in range(3):  # the first is a warm-up
        start = time.perf_counter()
        if side == "plain":
            total, count = plain_loss(model, task, examples, causal)
            loss = total / count
        else:
            loss = task.evaluate(model, examples)["loss"]
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times[1:]), "loss": loss, "rows": len(examples),
            "tokens": sum(task.length(e) for e in examples), "batch_size": cfg.train.eval_batch_size,
            "malloc": active()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default=",".join(JOBS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    from deltatune import allocator

    rows = []
    for job in args.job.split(","):
        runs = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in SIDES:
                env = allocator.child_environment("tcmalloc" if side == "deltatune" else "system") or \
                    allocator.child_environment("system")
                out = subprocess.run([sys.executable, __file__, "--worker", job, side], capture_output=True,
                                     text=True, env=env, cwd=Path(__file__).parent)
                if out.returncode != 0:
                    sys.exit(f"{job} {side} failed:\n{out.stderr[-3000:]}")
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {job} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
        plain = statistics.median(x["seconds"] for x in runs["plain"])
        losses = [x["loss"] for side in SIDES for x in runs[side]]
        agree = (max(losses) - min(losses)) / abs(min(losses))
        if agree > 1e-4:
            sys.exit(f"{job}: the sides' losses differ by {agree:.2e} relative: {losses}")
        for side in SIDES:
            s = statistics.median(x["seconds"] for x in runs[side])
            rows.append({"job": job, "side": side, "seconds": round(s, 3), "speedup_vs_plain": round(plain / s, 3),
                         "loss_spread_rel": agree, **{k: runs[side][0][k] for k in ("rows", "tokens", "batch_size",
                                                                                      "malloc")},
                         "rounds": runs[side]})
            print(f"{job:10} {side:18} {s:7.3f} s  x{plain / s:5.2f}  ({runs[side][0]['rows']} rows, "
                  f"{runs[side][0]['malloc']})")
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
