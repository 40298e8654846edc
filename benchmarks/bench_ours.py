"""Our side of benchmarks/run.py: deltatune's own loop (``build_job`` + ``run_loop``) on a workload.

Step times come from the run's log: the loop records the cumulative real tokens and tokens/s after
each optimizer step, and its clock covers forward, backward, clipping, optimizer and scheduler
only. The log is also where the step's end is stamped (wall and CPU clocks) for CPU utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench_common import Step, check_budget, checksum, now, summarize, train_order
from deltatune.rundir import RunDir
from deltatune.train.loop import adamw, run_loop
from deltatune.train.precision import bf16_enabled
from deltatune.train.run import build_job


@dataclass
class StampedRun(RunDir):
    """A run directory that notes when each training step's log line is written."""
    records: list = field(default_factory=list)

    def append_log(self, record: dict) -> None:
        super().append_log(record)
        if "loss" in record:  # a training step (evaluation lines carry "eval")
            self.records.append((record, *now()))


def steps_from_log(records: list) -> list[Step]:
    steps, tokens, seconds = [], 0, 0.0
    for record, wall, cpu in records:
        total_seconds = record["tokens"] / record["tokens_per_s"]  # the loop's clock, cumulative
        steps.append(Step(total_seconds - seconds, record["tokens"] - tokens, record["loss"], wall, cpu))
        tokens, seconds = record["tokens"], total_seconds
    return steps


def optimizer_name(model) -> str:
    fused = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-3).defaults["fused"]
    return f"torch.optim.AdamW ({'fused' if fused else 'default'})"


def measure(cfg, warmup: int, workdir: Path) -> dict:
    job, _, _ = build_job(cfg, None)
    t = cfg.train
    check_budget(len(job.train_examples), t.batch_size, t.max_steps)
    job.run = StampedRun(workdir / "ours-run")
    job.run.path.mkdir(parents=True)
    start = checksum(job.model)
    _, state = run_loop(job)
    if state.epoch != 0 or state.step != t.max_steps:
        raise SystemExit(f"ours: expected {t.max_steps} steps inside the first epoch, got {state.step} "
                         f"(epoch {state.epoch})")
    steps = steps_from_log(job.run.records)
    order = train_order(len(job.train_examples), t.seed)
    return {**summarize(steps, warmup, job.train_examples, order, t.batch_size),
            "trainable_params": sum(p.numel() for p in job.model.parameters() if p.requires_grad),
            "init_checksum": start, "bf16": bf16_enabled(t.bf16, torch.device("cpu")),
            "optimizer": optimizer_name(job.model), "chunked_loss": t.chunked_loss,
            "gradient_checkpointing": t.gradient_checkpointing, "pack": cfg.data.pack}
