"""Quality against plain references: the same task trained by `deltatune train` (each method's default
settings) and by a plain transformers + peft + torch loop written here from the libraries' documented APIs,
on the same rows, with the same nominal settings and seeds.

    python benchmarks/quality.py [--seeds 3] [--tasks minilm,smollm2] [--out benchmarks/results/quality.json]

Tasks and methods:
- minilm: MiniLM on Pang & Lee sentence polarity (1,024 training sentences, 400 held out, 2 epochs, batch 32):
  lora, full and feature_extraction. Metric: accuracy (and macro-F1), the better of the two epochs' evaluations
  on both sides (deltatune keeps its best evaluation's delta; the plain loop evaluates after each epoch too).
  The plain feature extraction is scikit-learn's LogisticRegressionCV on mean-pooled frozen features.
- smollm2: SmolLM2-135M-Instruct on chatterbot question/answer pairs (400 training pairs, 100 held out, one
  epoch, batch 8, loss on the answer, framed by the chat template): lora and full. Metric: held-out perplexity
  of the final weights, computed for both sides by the plain evaluator below (the same tokens scored).

Per seed k, both sides train on the same split (deltatune's prepared rows for train.seed=k; a seed sets the
split too) with the same learning rate (deltatune's default for the method), warm-up, weight decay, batch
size, epochs and maximum length. The comparison is paired by seed: the mean difference (deltatune minus
plain, in the metric's better direction) and its 95 % t-interval over the seeds; deltatune is "no worse
beyond seed noise" when that interval reaches zero or above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]

TASKS = {
    "minilm": {"config": "configs/minilm/classification-{method}.yaml", "methods": ["lora", "full", "feature_extraction"],
               "overrides": ["data.train_limit=1024", "data.eval_limit=400", "train.epochs=2", "train.batch_size=32",
                             "train.eval_every=0"]},
    "smollm2": {"config": "configs/smollm2-135m/causal_lm-{method}.yaml", "methods": ["lora", "full"],
                "overrides": ["data.train_limit=400", "data.eval_limit=100", "train.epochs=1", "train.batch_size=8",
                              "train.eval_every=0", "eval.forgetting=false"]},
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ----------------------------------------------------------------------------- the plain side

def _ids(encoded) -> list[int]:
    """apply_chat_template's token ids, whether it returns a list or a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _optimizer(model, lr: float, weight_decay: float, total: int, warmup_ratio: float):
    import torch
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)


def _lora(cfg, task_type: str):
    from peft import LoraConfig

    o = cfg.method.options
    return LoraConfig(task_type=task_type, r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
                      target_modules=list(o.target_modules) if o.target_modules else None)


def plain_classification(cfg, method: str, train_rows, eval_rows, labels, seed: int) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from deltatune.assets import resolve_model

    path, t, d = str(resolve_model(cfg.model)), cfg.train, cfg.data
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    texts = [r[d.text_column] for r in train_rows]
    y = np.array([labels.index(str(r[d.label_column])) for r in train_rows])
    eval_texts = [r[d.text_column] for r in eval_rows]
    ey = np.array([labels.index(str(r[d.label_column])) for r in eval_rows])

    def batches(items, size):
        for i in range(0, len(items), size):
            yield items[i:i + size]

    def encode(chunk):
        return tok(chunk, padding=True, truncation=True, max_length=t.max_length, return_tensors="pt")

    def scores(predicted) -> dict:
        return {"accuracy": float(accuracy_score(ey, predicted)), "macro_f1": float(f1_score(ey, predicted, average="macro"))}

    if method == "feature_extraction":
        from sklearn.linear_model import LogisticRegressionCV

        base = AutoModel.from_pretrained(path).eval()

        @torch.no_grad()
        def features(items):
            out = []
            for chunk in batches(items, 64):
                enc = encode(chunk)
                h = base(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                out.append((h * m).sum(1) / m.sum(1))
            return torch.cat(out).numpy()

        clf = LogisticRegressionCV(cv=5, max_iter=2000).fit(features(texts), y)
        return scores(clf.predict(features(eval_texts)))

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    if method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora(cfg, "SEQ_CLS"))
    per_epoch = math.ceil(len(texts) / t.batch_size)
    optimizer, scheduler = _optimizer(model, t.lr, t.weight_decay, per_epoch * t.epochs, t.warmup_ratio)
    generator = torch.Generator().manual_seed(seed)
    best = None
    for _ in range(t.epochs):
        model.train()
        for index in batches(torch.randperm(len(texts), generator=generator).tolist(), t.batch_size):
            loss = model(**encode([texts[i] for i in index]), labels=torch.tensor(y[index])).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            predicted = np.concatenate([model(**encode(c)).logits.argmax(-1).numpy() for c in batches(eval_texts, 64)])
        now = scores(predicted)
        best = now if best is None or now["accuracy"] > best["accuracy"] else best
    return best


def sft_example(tok, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) of one pair framed by the chat template, loss on the answer only."""
    head = _ids(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True))
    full = _ids(tok.apply_chat_template([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}], tokenize=True))
    ids, labels = full[:max_length], ([-100] * len(head) + full[len(head):])[:max_length]
    return (ids, labels) if any(v != -100 for v in labels) else None


def _padded(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def perplexity(model, tok, examples) -> float:
    """The plain evaluator: exp of the mean next-token loss over every answer token of ``examples``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            ids, mask, labels = _padded(examples[i:i + 16], tok.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                                           reduction="sum"))
            count += int((target != -100).sum())
    return math.exp(total / count)


def sft_rows(tok, rows, d, max_length: int):
    return [e for e in (sft_example(tok, r[d.prompt_column], r[d.response_column], max_length) for r in rows) if e]


def plain_sft(cfg, method: str, train_rows, eval_rows, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.assets import resolve_model

    path, t, d = str(resolve_model(cfg.model)), cfg.train, cfg.data
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    if method == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, _lora(cfg, "CAUSAL_LM"))
    train = sft_rows(tok, train_rows, d, t.max_length)
    optimizer, scheduler = _optimizer(model, t.lr, t.weight_decay, math.ceil(len(train) / t.batch_size) * t.epochs,
                                      t.warmup_ratio)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(t.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        for i in range(0, len(order), t.batch_size):
            ids, mask, labels = _padded([train[j] for j in order[i:i + t.batch_size]], tok.pad_token_id)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {"perplexity": perplexity(model, tok, sft_rows(tok, eval_rows, d, t.max_length))}


# ----------------------------------------------------------------------------- the deltatune side and the pairing

def deltatune_side(cfg, task: str, eval_rows) -> tuple[dict, float]:
    from deltatune.inference import load_run
    from deltatune.train.run import train

    from deltatune.rundir import RunDir

    started = time.perf_counter()
    run = RunDir(Path(cfg.output_dir))
    if run.status() != "completed":  # a rerun of the benchmark reuses completed runs, starts others over
        shutil.rmtree(run.path, ignore_errors=True)
        run = train(cfg)
    seconds = time.perf_counter() - started
    metrics = run.read_json("metrics.json")["eval"]
    if task == "minilm":
        return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}, seconds
    loaded = load_run(run.path)  # scored by the plain evaluator, so that both sides count the same tokens
    examples = sft_rows(loaded.tokenizer, eval_rows, cfg.data, cfg.train.max_length)
    return {"perplexity": perplexity(loaded.model, loaded.tokenizer, examples),
            "perplexity_deltatune_eval": metrics["perplexity"]}, seconds


def paired(ours: list[float], plain: list[float], higher: bool) -> dict:
    """Mean difference (ours minus plain, positive = ours better) with its 95 % t-interval over seeds."""
    diffs = [(a - b) if higher else (b - a) for a, b in zip(ours, plain)]
    mean = statistics.fmean(diffs)
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return {"mean": round(mean, 4), "low": round(mean - half, 4), "high": round(mean + half, 4),
            "no_worse_beyond_seed_noise": mean + half >= 0}


def run_task(task: str, seeds: list[int], folder: Path) -> dict:
    from deltatune.configure import load_config
    from deltatune.tasks import registry as tasks

    spec, out = TASKS[task], {}
    for method in spec["methods"]:
        sides = {"deltatune": [], "plain": []}
        for seed in seeds:
            cfg = load_config(ROOT / spec["config"].format(method=method), [
                *spec["overrides"], "train.lr=null", f"train.seed={seed}", "train.progress=false",
                f"output_dir={folder / task / method / f'seed-{seed}'}"])
            rows = tasks.get(cfg.task)(cfg).rows(None)
            train_rows, eval_rows = rows.splits["train"], rows.splits["eval"]
            ours, seconds = deltatune_side(cfg, task, eval_rows)
            started = time.perf_counter()
            if task == "minilm":
                labels = json.loads((Path(cfg.output_dir) / "labels.json").read_text())["labels"]
                plain = plain_classification(cfg, method, train_rows, eval_rows, labels, seed)
            else:
                plain = plain_sft(cfg, method, train_rows, eval_rows, seed)
            plain_seconds = time.perf_counter() - started
            sides["deltatune"].append({**ours, "seed": seed, "wall_s": round(seconds, 1)})
            sides["plain"].append({**plain, "seed": seed, "wall_s": round(plain_seconds, 1)})
            print(f"{task} {method} seed {seed}: deltatune {ours} plain {plain} (lr {cfg.train.lr:g})", file=sys.stderr)
        metric, higher = ("accuracy", True) if task == "minilm" else ("perplexity", False)
        mine, theirs = [r[metric] for r in sides["deltatune"]], [r[metric] for r in sides["plain"]]
        out[method] = {"lr": cfg.train.lr, "metric": metric, "runs": sides,
                       "deltatune_mean": round(statistics.fmean(mine), 4), "plain_mean": round(statistics.fmean(theirs), 4),
                       "difference": paired(mine, theirs, higher)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default="minilm,smollm2")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from deltatune.fs import cache_dir

    folder = cache_dir() / "bench-quality"
    seeds = [42 + k for k in range(1, args.seeds + 1)]
    result = {"seeds": seeds, "threads": torch.get_num_threads(),
              "tasks": {task: run_task(task, seeds, folder) for task in args.tasks.split(",")}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({t: {m: {k: v for k, v in r.items() if k != "runs"} for m, r in ms.items()}
                      for t, ms in result["tasks"].items()}, indent=2))


if __name__ == "__main__":
    main()
