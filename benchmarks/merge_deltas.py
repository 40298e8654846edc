"""Combined deltas against single-task deltas and one multi-task run (docs/multitask.md, "Combining deltas").

MiniLM + LoRA (configs/minilm/classification-lora.yaml, multitask-lora.yaml) on two packaged tasks:
Pang & Lee sentence polarity and CoNLL-2010 uncertainty. Per seed: one single-task run per task, the
multi-task run over both (the same rows per task, the same compute: twice the steps of one single-task
run), and the two single-task deltas combined by `merge-deltas` every way. Completed runs are reused, so
an interrupted measurement goes on where it stopped.

    python benchmarks/merge_deltas.py [--seeds 42 43 44] [--out ~/.cache/deltatune/merge-mt]

Writes OUT/results.json and prints the table docs/multitask.md shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from deltatune.combine import merge_deltas
from deltatune.configure import load_config
from deltatune.train.run import train

TASKS = {"sentiment": "pang-lee-sentences", "uncertainty": "conll2010-uncertainty"}
BUDGET = ["data.train_limit=1600", "data.eval_limit=400", "train.epochs=2", "train.lr=1.5e-3", "train.eval_every=0",
          "train.progress=false"]
WAYS = {"linear": {}, "linear-half": {"weights": [0.5, 0.5], "how": "linear"}, "ties": {"density": 0.5},
        "dare": {"density": 0.5}, "cat": {}}


def trained(config: str, out: Path, overrides: list[str]) -> Path:
    if not (out / "metrics.json").is_file():
        train(load_config(config, [*overrides, f"output_dir={out}"]))
    return out


def merged(sources: list[Path], out: Path, way: str) -> Path:
    if not (out / "metrics.json").is_file():
        options = {"how": way, **WAYS[way]}
        merge_deltas([str(s) for s in sources], names=list(TASKS), output_dir=str(out), progress=False, **options)
    return out


def task_figures(run: Path, task: str | None) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    figures = metrics["eval"]["tasks"][task] if task else metrics["eval"]
    return {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"],
            "seconds": metrics["train_seconds"], "trainable": metrics["trainable_params"]}


def one_seed(root: Path, seed: int) -> dict:
    base = [*BUDGET, f"train.seed={seed}"]
    folder = root / f"seed-{seed}"
    single = {name: trained("configs/minilm/classification-lora.yaml", folder / name, [*base, f"data.train={data}"])
              for name, data in TASKS.items()}
    multi = trained("configs/minilm/multitask-lora.yaml", folder / "multi", base)
    rows = {f"single-task ({name})": {name: task_figures(run, None)} for name, run in single.items()}
    rows["multi-task run"] = {name: task_figures(multi, name) for name in TASKS}
    for way in WAYS:
        run = merged(list(single.values()), folder / f"merge-{way}", way)
        rows[f"merge-deltas {way}"] = {name: task_figures(run, name) for name in TASKS}
    return rows


def table(results: dict[int, dict]) -> str:
    seeds = sorted(results)
    lines = [f"| run | {' | '.join(f'{t} accuracy' for t in TASKS)} | {' | '.join(f'{t} macro-F1' for t in TASKS)} |",
             "|---|" + "---|" * (2 * len(TASKS))]
    names = list(results[seeds[0]])
    for name in names:
        cells = []
        for key in ("accuracy", "macro_f1"):
            for task in TASKS:
                values = [results[s][name].get(task, {}).get(key) for s in seeds]
                values = [v for v in values if v is not None]
                cells.append(_mean_sd(values) if values else "")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", default=str(Path.home() / ".cache" / "deltatune" / "merge-mt"))
    args = parser.parse_args()
    root = Path(args.out).expanduser()
    results = {}
    for seed in args.seeds:
        results[seed] = one_seed(root, seed)
        (root / "results.json").write_text(json.dumps(results, indent=2))
        print(f"seed {seed} done", flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
