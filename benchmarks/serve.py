"""`deltatune serve` under load, against the same requests answered one at a time by plain transformers.

    python benchmarks/serve.py [--chat-requests 2000] [--chat-concurrency 16] [--classify-requests 5000]
                               [--classify-concurrency 32] [--baseline-chat 64] [--baseline-classify 500]
                               [--out benchmarks/results/serve.json]

Set-up (once, cached under $DELTATUNE_CACHE/bench-serve): three LoRA runs of SmolLM2-135M on chatterbot
(a few steps each, different seeds: three different deltas) and one LoRA run of MiniLM on Pang & Lee.
The server runs as `deltatune serve --run ...` in a subprocess on a free loopback port; the load comes
from an httpx client with a fixed number of requests in flight.

- chat: short chatterbot questions, 32 new tokens, greedy, spread round-robin over base + 3 deltas;
  `/v1/chat/completions`. Baseline: the same kind of request one at a time, `model.generate` of the
  plain transformers model with the delta's peft adapter (set per request), in this process.
- classify: Pang & Lee sentences, `/v1/classify` on the MiniLM run. Baseline: one forward per text.
- unmerged vs merged: tokens/s of the same requests all to one LoRA delta against all to its merged
  export (`deltatune export --format hf`'s folder, served as it is), interleaved twice.
- memory: the server's RSS with 1 base + 10 LoRA deltas against the weights of 10 merged copies
  (10 x one model's fp32 parameter bytes; the runtime itself not counted for them).

Reported: errors (must be 0), p50/p95/p99 latency, requests/s, generated tokens/s, and the ratios
against the baselines, measured in the same invocation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SMOL_RUNS = 3
NEW_TOKENS = 32


def _runs(folder: Path, extra_loras: int) -> dict[str, Path]:
    """The benchmark's runs (trained once, reused): smol-1..3 (+ extra LoRA copies for the memory figure)
    and the MiniLM classifier."""
    from deltatune.configure import load_config
    from deltatune.train.run import train

    quick = ["train.max_steps=3", "train.progress=false", "eval.forgetting=false", "data.eval_limit=8",
             "data.train_limit=64", "train.eval_every=3"]
    wanted = {f"smol-{i}": ("smollm2-135m/causal_lm-lora.yaml", [f"train.seed={i}"])
              for i in range(1, SMOL_RUNS + extra_loras + 1)}
    wanted["minilm-cls"] = ("minilm/classification-lora.yaml", [])
    runs = {}
    for name, (cfg, extra) in wanted.items():
        out = folder / name
        if not (out / "metrics.json").is_file():
            print(f"training {name} ...", file=sys.stderr)
            train(load_config(ROOT / "configs" / cfg, [*quick, *extra, f"output_dir={out}"]))
        runs[name] = out
    return runs


def _merged_run(run: Path) -> Path:
    """The run's merged export (``deltatune export --format hf``), which the server loads as its own model:
    the same requests then compare the unmerged delta against the merged weights, with the same answers."""
    from deltatune.export import export

    out = run.parent / f"{run.name}-merged-export"
    if not (out / "export.json").is_file():
        export(run, out, fmt="hf")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, runs: dict[str, Path]):
        self.port = _free_port()
        args = [sys.executable, "-m", "deltatune.cli", "serve", "--port", str(self.port)]
        for name, path in runs.items():
            args += ["--run", f"{name}={path}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("the server did not get ready")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS"))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _load(url: str, path: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body with ``concurrency`` requests in flight; latency per request, errors, totals."""
    import httpx

    latencies, errors, tokens = [], [], 0
    queue = list(enumerate(bodies))

    async def worker(client):
        nonlocal tokens
        while queue:
            _, body = queue.pop()
            start = time.perf_counter()
            try:
                r = await client.post(path, json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                tokens += r.json().get("usage", {}).get("completion_tokens", 0)
            except httpx.HTTPError as exc:
                errors.append(repr(exc))
                continue
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [latencies[0]] * 99 if latencies else [0] * 99
    return {"requests": len(bodies), "errors": len(errors), "first_errors": errors[:3], "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "generated_tokens": tokens,
            "generated_tokens_per_s": round(tokens / wall, 1),
            "load_generator_cores": round(cpu / wall, 2),  # CPU the client itself took, on the server's cores
            "latency_ms": {"p50": round(q[49] * 1000, 1), "p95": round(q[94] * 1000, 1), "p99": round(q[98] * 1000, 1)}}


def _questions(n: int) -> list[str]:
    from deltatune.assets import resolve_data

    rows = [json.loads(line) for line in resolve_data("chatterbot").read_text().splitlines()]
    rng = random.Random(0)
    return [rng.choice(rows)["prompt"] for _ in range(n)]


def _sentences(n: int) -> list[str]:
    import csv

    from deltatune.assets import resolve_data

    with open(resolve_data("pang-lee-sentences"), newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    rng = random.Random(0)
    return [rng.choice(texts) for _ in range(n)]


def _chat_bodies(questions: list[str], models: list[str]) -> list[dict]:
    return [{"model": models[i % len(models)], "messages": [{"role": "user", "content": q}],
             "max_tokens": NEW_TOKENS, "temperature": 0} for i, q in enumerate(questions)]


def _baseline_chat(runs: dict[str, Path], questions: list[str]) -> dict:
    """One request at a time: plain transformers generate, the delta's adapter set per request."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.assets import resolve_model

    folder = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    names = [f"smol-{i}" for i in range(1, SMOL_RUNS + 1)]
    model = PeftModel.from_pretrained(model, runs[names[0]] / "delta", adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(runs[name] / "delta", adapter_name=name)
    model.eval()
    models = ["base", *names]
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i, q in enumerate(questions):
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            name = models[i % len(models)]
            if name == "base":
                with model.disable_adapter():
                    out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    wall = time.perf_counter() - start
    return {"requests": len(questions), "generated_tokens": tokens, "wall_s": round(wall, 2),
            "requests_per_s": round(len(questions) / wall, 2), "generated_tokens_per_s": round(tokens / wall, 1)}


def _baseline_classify(run: Path, texts: list[str], batch: int) -> dict:
    """One forward per text; and, as the ceiling any server could reach on these cores, the same texts in
    batches of ``batch`` cut by length (the server's own rule), in this process: no HTTP, no waiting."""
    import torch

    from deltatune.inference import load_run
    from deltatune.serve.batching import length_batches

    loaded = load_run(run)
    lengths = [len(ids) for ids in loaded.tokenizer(texts)["input_ids"]]
    with torch.inference_mode():
        start = time.perf_counter()
        for text in texts:
            loaded.task.predict(loaded.model, loaded.tokenizer, [text])
        wall = time.perf_counter() - start
        start = time.perf_counter()
        for group in range(0, len(texts), batch):  # batches as they would arrive: ``batch`` texts at a time
            chunk = texts[group:group + batch]
            for rows in length_batches(lengths[group:group + batch], batch):
                loaded.task.predict(loaded.model, loaded.tokenizer, [chunk[i] for i in rows])
        batched = time.perf_counter() - start
    return {"requests": len(texts), "wall_s": round(wall, 2), "requests_per_s": round(len(texts) / wall, 2),
            "in_process_batched_requests_per_s": round(len(texts) / batched, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chat-requests", type=int, default=2000)
    ap.add_argument("--chat-concurrency", type=int, default=16)
    ap.add_argument("--classify-requests", type=int, default=5000)
    ap.add_argument("--classify-concurrency", type=int, default=32)
    ap.add_argument("--baseline-chat", type=int, default=64, help="requests the one-at-a-time baseline answers")
    ap.add_argument("--baseline-classify", type=int, default=500)
    ap.add_argument("--merged-requests", type=int, default=256, help="requests of the unmerged-vs-base comparison")
    ap.add_argument("--memory", action="store_true", help="also measure 1 base + 10 LoRA deltas (trains 7 more runs)")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()

    from deltatune.fs import cache_dir

    folder = cache_dir() / "bench-serve"
    runs = _runs(folder, extra_loras=7 if args.memory else 0)
    result = {"machine": os.cpu_count(), "new_tokens": NEW_TOKENS}

    chat_runs = {n: p for n, p in runs.items() if n.startswith("smol-") and int(n.split("-")[1]) <= SMOL_RUNS}
    merged = _merged_run(runs["smol-1"])
    server = Server({**chat_runs, "smol-1-merged": merged, "minilm-cls": runs["minilm-cls"]})
    try:
        server.wait_ready()
        result["server_rss_mb"] = round(server.rss_mb(), 1)
        import httpx

        served = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
        smol_base = next(m for m in served if m.startswith("base:") and "smol" in m.lower())  # two bases served
        models = [smol_base, *chat_runs]
        result["served"] = served
        bodies = _chat_bodies(_questions(args.chat_requests), models)
        result["chat"] = asyncio.run(_load(server.url, "/v1/chat/completions", bodies, args.chat_concurrency))
        print("chat:", json.dumps(result["chat"]), file=sys.stderr)
        sentences = _sentences(args.classify_requests)
        result["classify"] = asyncio.run(_load(server.url, "/v1/classify",
                                               [{"model": "minilm-cls", "input": s} for s in sentences],
                                               args.classify_concurrency))
        print("classify:", json.dumps(result["classify"]), file=sys.stderr)
        questions = _questions(args.merged_requests)
        for key, model in (("unmerged_lora", "smol-1"), ("merged", "smol-1-merged"),
                           ("unmerged_lora_again", "smol-1"), ("merged_again", "smol-1-merged")):  # interleaved
            result[key] = asyncio.run(_load(server.url, "/v1/chat/completions", _chat_bodies(questions, [model]),
                                            args.chat_concurrency))
    finally:
        server.stop()

    result["baseline_chat"] = _baseline_chat(runs, _questions(args.baseline_chat))
    result["baseline_classify"] = _baseline_classify(runs["minilm-cls"], _sentences(args.baseline_classify),
                                                     args.classify_concurrency)
    result["ratios"] = {
        "chat_generated_tokens_per_s": round(result["chat"]["generated_tokens_per_s"]
                                             / result["baseline_chat"]["generated_tokens_per_s"], 2),
        "classify_requests_per_s": round(result["classify"]["requests_per_s"]
                                         / result["baseline_classify"]["requests_per_s"], 2),
        "classify_in_process_batched_ceiling": round(result["baseline_classify"]["in_process_batched_requests_per_s"]
                                                     / result["baseline_classify"]["requests_per_s"], 2),
        "unmerged_over_merged_tokens_per_s": round(
            statistics.median([result["unmerged_lora"]["generated_tokens_per_s"],
                               result["unmerged_lora_again"]["generated_tokens_per_s"]])
            / statistics.median([result["merged"]["generated_tokens_per_s"],
                                 result["merged_again"]["generated_tokens_per_s"]]), 3),
    }
    if args.memory:
        ten = {n: p for n, p in runs.items() if n.startswith("smol-")}
        server = Server(ten)
        try:
            server.wait_ready()
            result["memory"] = {"server_with_1_base_10_lora_mb": round(server.rss_mb(), 1)}
        finally:
            server.stop()
        result["memory"]["ten_merged_copies_mb"] = round(10 * _one_model_mb(), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    errors = result["chat"]["errors"] + result["classify"]["errors"]
    return 1 if errors else 0


def _one_model_mb() -> float:
    """What each merged copy of SmolLM2 costs once it serves: its weights' bytes (fp32). (The RSS right
    after loading says nothing: safetensors maps the file and pages come in only as a forward reads them.)"""
    code = ("import torch;from transformers import AutoModelForCausalLM;from deltatune.assets import resolve_model;"
            "m=AutoModelForCausalLM.from_pretrained(resolve_model('smollm2-135m'),dtype=torch.float32);"
            "print(sum(p.numel()*p.element_size() for p in m.parameters())/2**20)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    sys.exit(main())
