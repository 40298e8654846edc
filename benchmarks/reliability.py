"""Crash consistency from outside: SIGKILL a MiniLM + LoRA run at random moments, then recover it.

    python benchmarks/reliability.py [--kills 100] [--seed 0] [--out benchmarks/results/reliability.json]

An uninterrupted run is measured first (its wall time T, after a warm-up run; its delta and metrics). Then, ``--kills``
times: the same run starts in a fresh process (forked from a server that imported deltatune once),
is killed with SIGKILL after a delay drawn uniformly from [0, 1.05 T], and is recovered as a user
would: ``deltatune train --resume`` if it wrote its config, a new ``train`` into the same folder if
it did not. Each recovered run must equal the uninterrupted one: the same delta bit for bit and the
same evaluation metrics. Counted by where the kill landed (read from the folder before recovery)
and how it ended; anything else is counted as lost, with the error. Results go to RELIABILITY.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

OVERRIDES = ["model=minilm", "task=classification", "method.name=lora", "data.train=pang-lee-sentences",
             "data.train_limit=60", "data.eval_limit=40", "train.batch_size=8", "train.max_length=64",
             "train.epochs=2", "train.eval_every=3", "train.save_every=2", "train.lr=5e-4", "train.progress=false"]


def _train(out: str, registry: str) -> None:
    os.environ["DELTATUNE_REGISTRY"] = registry
    from deltatune.configure import load_config
    from deltatune.train.run import train

    train(load_config(None, [*OVERRIDES, f"output_dir={out}"]))


def _outcome(path: Path) -> tuple:
    from safetensors.torch import load_file

    metrics = json.loads((path / "metrics.json").read_text())
    delta = {}
    for file in sorted((path / "delta").glob("*.safetensors")):
        delta.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    return metrics["eval"], metrics["baseline"], delta


def _same(a: tuple, b: tuple) -> bool:
    import torch

    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def _phase(path: Path) -> str:
    """Where the kill landed, from what the folder holds."""
    if not (path / "config.yaml").is_file():
        return "before the config"
    if (path / "metrics.json").is_file():
        return "finishing (after the commit record)"
    if (path / "delta").exists() or any(path.glob(".delta.*")):
        return "finishing (before the commit record)"
    if not (path / "baseline.json").is_file():
        return "writing inputs / baseline"
    checkpoint = path / "checkpoint" / "state.json"
    if not checkpoint.is_file():
        return "training, before the first checkpoint" if not any(path.glob(".checkpoint.*")) else \
            "writing the first checkpoint"
    return "training, after a checkpoint"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/reliability.json")
    args = ap.parse_args()

    from deltatune.train.run import resume, train  # noqa: F401  (the parent recovers in-process)
    from deltatune.configure import load_config

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["deltatune.train.run"])
    work = Path(tempfile.mkdtemp(prefix="deltatune-reliability-"))
    registry = str(work / "registry.sqlite")
    os.environ["DELTATUNE_REGISTRY"] = registry

    for attempt in ("warm-up", "straight"):  # the first also starts the fork server (imports deltatune)
        start = time.perf_counter()
        child = context.Process(target=_train, args=(str(work / attempt), registry))
        child.start()
        child.join()
        wall = time.perf_counter() - start
        if child.exitcode != 0:
            print("the uninterrupted run failed", file=sys.stderr)
            return 1
    reference = _outcome(work / "straight")
    print(f"uninterrupted run: {wall:.1f} s", file=sys.stderr)

    rng = random.Random(args.seed)
    phases, endings, lost = Counter(), Counter(), []
    for i in range(args.kills):
        out = work / f"k{i}"
        delay = rng.uniform(0, 1.05 * wall)
        child = context.Process(target=_train, args=(str(out), registry))
        child.start()
        child.join(delay)
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            child.join()
        phase = "finished before the kill" if child.exitcode == 0 else _phase(out)
        phases[phase] += 1
        try:
            if child.exitcode == 0:
                ending = "finished"
            elif not (out / "config.yaml").is_file():
                train(load_config(None, [*OVERRIDES, f"output_dir={out}"]))
                ending = "started again"
            else:
                complete = (out / "metrics.json").is_file()
                resume(out)
                ending = "completed by resume" if complete else "resumed"
            if not _same(_outcome(out), reference):
                raise AssertionError("differs from the uninterrupted run")
            status = json.loads((out / "status.json").read_text())["status"]
            if status != "completed":
                raise AssertionError(f"status {status}")
        except BaseException as exc:  # noqa: BLE001  (counted and reported)
            ending = "lost"
            lost.append({"kill": i, "delay_s": round(delay, 2), "phase": phase, "error": f"{type(exc).__name__}: {exc}"})
        endings[ending] += 1
        print(f"{i + 1}/{args.kills}: killed at {delay:.1f} s ({phase}): {ending}", file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)

    result = {"kills": args.kills, "seed": args.seed, "uninterrupted_wall_s": round(wall, 1),
              "run": OVERRIDES, "phases": dict(phases), "endings": dict(endings), "lost": lost,
              "identical": args.kills - len(lost)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
