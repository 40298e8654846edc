"""Every method on the same data and budget: metric, trainable parameters, delta size, time, memory.

    python benchmarks/methods.py --model minilm      # Pang & Lee polarity, classification
    python benchmarks/methods.py --model smollm2     # chatterbot SFT
    python benchmarks/methods.py --render            # rewrite docs/methods.md from the results

Each method runs `deltatune train configs/<model>/<task>-<method>.yaml` with the shared budget
below, in its own process (so peak RSS is that run's own), one after another.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SUITES = {
    "minilm": {
        "configs": "minilm/classification-{}.yaml",
        "metric": "accuracy",
        "budget": ["data.train_limit=1024", "data.eval_limit=400", "train.epochs=2", "train.batch_size=32",
                   "train.eval_every=0"],
        "methods": ["full", "freeze", "feature_extraction", "bitfit", "houlsby", "lora", "ia3", "prefix",
                    "prompt", "ptuning", "vera", "loha", "lokr", "oft", "adalora", *["lora-" + v for v in (
                        "dora", "rslora", "pissa", "olora", "plus", "eva")], "qlora", "qlora-loftq"],
    },
    "smollm2": {
        "configs": "smollm2-135m/causal_lm-{}.yaml",
        "metric": "perplexity",
        "budget": ["data.train_limit=320", "data.eval_limit=100", "train.epochs=1", "train.batch_size=8",
                   "train.eval_every=0"],
        "methods": ["full", "freeze", "houlsby", "lora", "ia3", "prefix", "prompt", "ptuning", "vera", "loha", "lokr",
                    "oft", "adalora", *["lora-" + v for v in ("dora", "rslora", "pissa", "olora", "plus", "eva")],
                    "qlora", "qlora-loftq"],
    },
}
STARTED = time.strftime("%Y-%m-%d")  # the day this measurement began: every row of one invocation has it
# LoRA's options, each measured as a row of its own: the lora (qlora-...: qlora) config with these overrides.
VARIANTS = {"lora-dora": ["method.use_dora=true"], "lora-rslora": ["method.use_rslora=true"],
            "lora-pissa": ["method.init=pissa"], "lora-olora": ["method.init=olora"],
            "lora-plus": ["method.loraplus_lr_ratio=16"], "lora-eva": ["method.init=eva"],
            "qlora-loftq": ["method.init=loftq"]}


def base_method(method: str) -> str:
    """The method whose config a row trains: a variant's prefix (lora-dora -> lora, qlora-loftq -> qlora)."""
    return method.split("-")[0] if method in VARIANTS else method
# docs/methods.md from its top to this heading is generated here; the rest is written by hand.
HAND_WRITTEN = "## Default learning rates"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(suite: dict, method: str, workdir: Path) -> dict:
    config = ROOT / "configs" / suite["configs"].format(base_method(method))
    out = workdir / method
    cmd = [sys.executable, "-m", "deltatune.cli", "train", str(config), *suite["budget"], *VARIANTS.get(method, []),
           "train.progress=false", f"output_dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1]}
    m = json.loads((out / "metrics.json").read_text())
    key = suite["metric"]
    return {"method": method, "metric": key, "before": m["baseline"][key], "after": m["eval"][key],
            "macro_f1": m["eval"].get("macro_f1"), "trainable_params": m["trainable_params"],
            "total_params": m["total_params"], "delta_bytes": dir_bytes(out / "delta"),
            "train_seconds": m["train_seconds"], "wall_seconds": round(wall, 1), "peak_rss_mb": m["peak_rss_mb"],
            "steps": m["steps"], "command": " ".join(["deltatune", *cmd[3:-2]]),
            "shared_machine": (m.get("machine_load") or {}).get("contended"), "date": STARTED}


def render() -> str:
    lines = ["# Methods compared", "",
             "Every method trained on the same data with the same budget, each in its own process, one after",
             "another on one machine. Produced by `python benchmarks/methods.py --model minilm` and",
             "`--model smollm2`; the raw results are in `benchmarks/results/`. Figures are as measured,",
             "on a 2-core CPU machine whose timings vary 10-38% from run to run.", ""]
    for name, suite in SUITES.items():
        path = RESULTS / f"methods-{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        dates = sorted({r.get("date", data["date"]) for r in data["results"]})
        when = (f"measured {dates[0]}" if len(dates) == 1 else
                f"rows measured on different days ({', '.join(dates)}: the last column), each row's own run")
        lines += [f"## {data['title']}", "", *SUITE_NOTES.get(name, []),
                  f"Budget: `{' '.join(suite['budget'])}`; {when} ({data['machine']}). "
                  "A time marked * was measured while other processes used the cores the run needed.", ""]
        key = suite["metric"]
        extra = " | macro-F1" if key == "accuracy" else ""
        day = " | measured" if len(dates) > 1 else ""
        lines += [f"| method | {key} before | {key} after{extra} | trainable params | % | delta on disk | "
                  f"train time | peak RSS{day} |",
                  "|---|---|---|" + ("---|" if extra else "") + "---|---|---|---|---|" + ("---|" if day else "")]
        for r in data["results"]:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} |")
                continue
            f1 = f" | {r['macro_f1']:.3f}" if extra else ""
            shared = " *" if r.get("shared_machine") else ""
            lines.append(f"| {r['method']} | {r['before']:.3f} | {r['after']:.3f}{f1} | {r['trainable_params']:,} | "
                         f"{100 * r['trainable_params'] / r['total_params']:.3f} | "
                         f"{r['delta_bytes'] / 1e6:.2f} MB | {r['train_seconds']:.0f} s{shared} | "
                         f"{r['peak_rss_mb']:,.0f} MB{' | ' + r.get('date', data['date']) if day else ''} |")
        lines.append("")
    return "\n".join(lines + NOTES)


SUITE_NOTES = {"smollm2": """> Rows measured 2026-11-24 predate the data pipeline's de-duplication of chatterbot: more than half of
> its 2,026 pairs are exact repeats, so many of their held-out pairs were also training pairs and their
> perplexities are optimistic (their "before" is 15.5). Rows measured 2026-12-01 and 2026-12-02 (one session)
> use the de-duplicated data (their "before" is 17.7): compare them with each other, not with the older rows. To re-run them all:
> `python benchmarks/methods.py --model smollm2`.
""".splitlines() + [""]}

NOTES = """## Reading the numbers

- "before" is the untouched base model on the same evaluation rows (for a classifier: with its new,
  untrained head; feature_extraction's head reads mean-pooled features, hence its own starting point).
- The budget is deliberately small (64 steps for MiniLM, 40 for SmolLM2) so every method runs here;
  the ranking can change with longer training, and learning rates are each config's, not tuned.
- Soft prompts (prefix, prompt, ptuning) learn slowly at this budget, as their papers lead one to
  expect for small models. Prefix tuning on SmolLM2 starts from random key/value prefixes in every
  layer, which break the model (perplexity about 33,600 with the fresh prefix, before any training);
  40 steps bring it to 186, still far worse than the base. Try `method.projection=true`, more steps
  or a lower learning rate before using it on a decoder.
- The MiniLM rows are one invocation (2026-12-01). Its first six runs (full to lora) shared the cores
  with other jobs (their times are marked * and are not comparable with the rest); from ia3 on the runs
  had the machine to themselves. Accuracies are one seed each on 400 held-out sentences: one standard
  error is about 2.5 points.
- At this budget and their default rates (docs/methods.md, "Default learning rates"; not swept), VeRA
  (0.613), LoHa (0.547), LoKr (0.537), OFT (0.565) and AdaLoRA (0.552) stay well below LoRA's options and
  full fine-tuning. LoRA's options all beat plain LoRA at its default rate (0.623), which is too low for
  64 steps (docs/methods.md's sweep: 3x is best at this budget): rsLoRA 0.720 and LoRA+ 0.740 raise the
  effective rate of the update (rsLoRA's scale alpha / sqrt(r) is sqrt(8) times alpha / r; LoRA+ trains
  B at 16x), PiSSA (0.745) and OLoRA (0.718) start from W's main directions; DoRA (0.640) is within
  noise of plain LoRA at 1.3x its peak memory. One seed at one budget: a hint, not a verdict.
- lora-eva (EVA's data-driven start, `method.init: eva`) was measured alone on 2026-12-02, while other
  developers' jobs kept the 2-core machine busy (load 6-7): 0.713 against plain LoRA's 0.623 at the same
  rate. EVA moved the config's 8 x 37 ranks between its 37 adapted layers (5 to 12 each, none dropped;
  the pooler's dense got 12), so it trains 323,714 parameters instead of 338,690 (the total rank is kept,
  the layers' widths differ). From the process's start to EVA's file (imports, data, model and the pass
  over 8 batches of 32; the pass not timed alone) took 3.5 minutes of that busy wall time, none of it in
  the train time; the train time itself is contended. One seed: a hint, not a verdict.
- qlora and qlora-loftq (`method.init: loftq`) were measured on 2026-12-02 (qlora's time while tests ran
  beside it): 0.608 and 0.605. LoftQ corrects the 4-bit base's quantization error at the start; on a model of
  this size the error costs little (qlora 0.608 against lora's 0.623 at the same rate), so there was little
  to win. One seed.
- SmolLM2: the 2026-11-24 rows were measured while other work shared the cores at times (full, freeze
  and ptuning especially), the 2026-12-01 rows (full, lora, vera) while other jobs always did (marked *),
  the 2026-12-02 rows alone (but oft): compare quality and size columns freely, times with care. On the
  de-duplicated data, at 40 steps and default rates: rsLoRA 8.41, OFT 8.71, PiSSA 8.71, DoRA 9.04, LoRA+
  9.04, LoRA 9.06, full 9.31; OLoRA 12.6, VeRA 13.8, LoKr 15.5, LoHa 16.8 and AdaLoRA 17.5 barely move
  from 17.65 at their default rates (AdaLoRA also prunes ranks during these few steps). One seed.
- SmolLM2, 2026-12-02, the machine alone: lora-eva 8.60 (LoRA 9.06; EVA's pass over 8 batches adds about 2.5
  minutes of wall time before the first step); qlora 10.32 and qlora-loftq 10.11: the 4-bit base starts at 23.86
  (the fp32 base: 17.65) and LoftQ's rank-16 correction of the quantization error starts it at 23.30. One seed.
""".splitlines()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=list(SUITES))
    parser.add_argument("--methods", help="comma-separated subset")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/methods.md")
    args = parser.parse_args()
    if args.model:
        suite = SUITES[args.model]
        methods = args.methods.split(",") if args.methods else suite["methods"]
        title = {"minilm": "MiniLM (22.7M) on Pang & Lee sentence polarity",
                 "smollm2": "SmolLM2-135M on chatterbot question/answer SFT"}[args.model]
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for method in methods:
                results.append(run_one(suite, method, Path(tmp)))
                print(json.dumps(results[-1]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"methods-{args.model}.json"
        if args.methods and path.is_file():  # a re-run of some methods replaces just their rows
            fresh = {r["method"]: r for r in results}
            old = json.loads(path.read_text())["results"]
            results = [fresh.pop(r["method"], r) for r in old] + list(fresh.values())
        path.write_text(json.dumps(
            {"title": title, "date": time.strftime("%Y-%m-%d"), "results": results,
             "machine": f"{platform.machine()}, {platform.python_version()}"}, indent=1))
    doc = ROOT / "docs" / "methods.md"
    kept = doc.read_text().split(HAND_WRITTEN, 1)
    doc.write_text(render() + ("\n" + HAND_WRITTEN + kept[1] if len(kept) == 2 else ""))


if __name__ == "__main__":
    main()
