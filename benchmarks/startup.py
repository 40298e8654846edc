"""Start-up time of the commands that only read configs, registries or run folders (issue 19): each
run as a fresh process of the installed entry point, against `python -c pass` in the same run.

    python benchmarks/startup.py [--repeats 5] [--out benchmarks/results/startup.json]

Every command runs --repeats times, round robin (so a burst of load on the machine hits all of them
alike), and the median wall-clock time is reported. `runs list` reads a fresh empty registry
($DELTATUNE_REGISTRY in a temporary folder); `eval RUN_DIR` reads the metrics.json of a finished run
written by hand (metrics.json, status.json, delta/). The goal is under 1.5 s for each.
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
ENTRY = Path(sys.executable).parent / "deltatune"  # the venv's console script

COMMANDS = {
    "--help": ["--help"],
    "validate --explain": ["validate", "--explain"],
    "validate CONFIG": ["validate", str(ROOT / "configs/minilm/classification-lora.yaml")],
    "methods": ["methods"],
    "tasks": ["tasks"],
    "runs list": ["runs", "list"],
    "eval RUN_DIR": ["eval", "{run}"],
}


def finished_run(folder: Path) -> Path:
    """A run directory that `deltatune eval RUN_DIR` accepts (RunDir.require_complete) and reads."""
    run = folder / "run"
    (run / "delta").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"eval": {"accuracy": 0.9}, "steps": 10}))
    (run / "status.json").write_text(json.dumps({"status": "completed"}))
    return run


def wall(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr[-1000:]}")
    return seconds


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DELTATUNE_REGISTRY": str(Path(tmp) / "registry.sqlite"), "HF_HUB_OFFLINE": "1"}
        run = str(finished_run(Path(tmp)))
        cmds = {"python -c pass": [sys.executable, "-c", "pass"],
                **{name: [str(ENTRY), *(run if a == "{run}" else a for a in argv)] for name, argv in COMMANDS.items()}}
        load_before = os.getloadavg()[0]
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                times[name].append(wall(cmd, env))
        load_after = os.getloadavg()[0]
    medians = {name: round(statistics.median(t), 3) for name, t in times.items()}
    return {
        "repeats": args.repeats, "goal_s": 1.5, "median_s": medians,
        "over_baseline_s": {name: round(m - medians["python -c pass"], 3) for name, m in medians.items()},
        "runs_s": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "load_average": {"start": load_before, "end": load_after}, "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def main() -> None:
    from bench_common import run_and_write

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    run_and_write(parser, measure, "startup")


if __name__ == "__main__":
    main()
