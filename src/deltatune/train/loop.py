"""The one training loop, for every task and method (a method that fits its delta directly, such as
feature extraction's head, does that instead of the steps: ``Method.fit``).

AdamW with linear warm-up and decay, gradient accumulation and clipping on accelerate,
periodic evaluation, keeping the best delta, and checkpoints from which a resumed run
reproduces an uninterrupted one exactly (same data order, RNG, optimizer and schedule state).
Memory and speed options (``train.chunked_loss``, ``train.bf16``, ``train.gradient_checkpointing``)
change how a step is computed, not what it computes (bf16 up to rounding).

Several processes (``accelerate launch``, docs/scale.md): each trains on its shard of every
step's batches and DDP averages the gradients; a step over P processes with batch b computes
what one process computes with batch P * b (the loss is normalised by the item count summed
over processes). Only the main process writes: log, evaluations (run on the whole evaluation
set, so metrics equal a single-process run's), the best delta and checkpoints. Under FSDP
(``sharding``) every process holds a shard of each parameter, so every process evaluates (the
forward needs them all) and takes part in gathering the delta and checkpoints the main one writes.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..errors import DeltatuneError, NonFiniteError
from ..fs import atomic_dir, atomic_write_text
from ..methods.base import Method
from ..models import is_sharded
from ..rundir import OUTCOMES, RunDir, is_main_process
from ..tasks.base import Task
from . import sharding
from .checkpoint import LoopState, load_checkpoint, save_checkpoint
from .machine_load import Watch
from .precision import bf16_enabled, cpu_bf16_speedup
from .progress import Progress, phase

Callback = Callable[[LoopState], None]


@dataclass
class Job:
    """Everything the loop needs, already built and checked."""
    model: nn.Module
    method: Method
    options: object
    task: Task  # bound to the run's settings: loss, evaluation, batching and the main metric
    train_examples: list
    eval_examples: list
    run: RunDir
    train: TrainConfig

    @property
    def labels(self) -> list[str] | None:
        return self.task.labels

    @property
    def pad_id(self) -> int:
        return self.task.pad_id


def schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def adamw(param_groups, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one pass over all tensors) where every parameter's device and dtype
    have it: on CPUs it is ~4.5x faster than the default per-tensor loop (MiniLM's 22.7M parameters:
    15 against 70 ms a step, BENCHMARKS.md); torch's default otherwise."""
    groups = param_groups if isinstance(param_groups[0], dict) else [{"params": param_groups}]
    devices = set(_fused_kernels_devices())
    fused = all(p.device.type in devices and torch.is_floating_point(p) for g in groups for p in g["params"])
    return torch.optim.AdamW(param_groups, fused=fused or None, **kwargs)


def param_groups(model: nn.Module, method: Method, options, lr: float, weight_decay: float) -> list[dict]:
    """AdamW's groups of the trainable parameters: no weight decay on biases and norms (1-D), and each rate the
    method asks for (``Method.lr_scale``: LoRA+ trains B faster) in groups of its own at ``lr`` x scale; the
    scheduler multiplies every group's rate by the same factor. The two groups at ``lr`` always come first, even
    empty: the log's rate is the first group's, and checkpoints from before the scales still load."""
    groups: dict[tuple[float, bool], list] = {(1.0, True): [], (1.0, False): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((float(method.lr_scale(name, options)), param.ndim >= 2), []).append(param)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (scale, decay), params in groups.items() if params or scale == 1.0]


def _fused_kernels_devices() -> list[str]:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without it: no fused AdamW
        return []
    return _get_fused_kernels_supported_devices()


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute every transformer layer in backward. Non-reentrant checkpointing lets gradients reach
    adapters inside a layer even when its input needs none (a frozen base under LoRA)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # peft models pass it to their base
    if enable is None:
        warnings.warn(f"train.gradient_checkpointing: {type(model).__name__} runs no transformer layers in "
                      "training (nothing to recompute); ignored")
        return
    try:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as exc:
        raise DeltatuneError(f"train.gradient_checkpointing: {exc}; set train.gradient_checkpointing=false") from exc


def run_loop(job: Job, resume: bool = False, callbacks: tuple[Callback, ...] = ()) -> tuple[dict, LoopState]:
    """Train; returns the evaluation metrics of the best delta (saved in ``run.best``) and the final state."""
    t = job.train
    if not resume:
        fitted = _fit_directly(job)
        if fitted is not None:
            return fitted
    if t.gradient_checkpointing:
        enable_gradient_checkpointing(job.model)
    main = is_main_process()  # first: refuses a multi-process launch that accelerate would not join
    accelerator = Accelerator()  # accumulation is explicit below: exact across epochs and resumes
    sharded_here = sharding.shard(job.model, accelerator)  # FSDP on the CPU, which accelerate leaves undone
    optimizer = adamw(param_groups(job.model, job.method, job.options, t.lr, t.weight_decay), lr=t.lr)
    # From the prepared loader: with several processes each one sees its shard of the batches.
    per_epoch = math.ceil(len(_epoch_loader(job, 0, accelerator)) / t.grad_accum)
    total = t.max_steps or per_epoch * t.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(int(t.warmup_ratio * total), total))
    if sharded_here:  # prepare would wrap the sharded model in DDP as well
        model, optimizer = job.model, accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(job.model, optimizer)
    everyone = is_sharded(model)  # each process holds a shard: all evaluate, all gather what main saves
    bf16 = bf16_enabled(t.bf16, accelerator.device)
    autocast = (lambda: torch.autocast(accelerator.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    state = LoopState()
    best_metrics = None
    if resume:
        state = load_checkpoint(job.run.checkpoint, accelerator.unwrap_model(model), optimizer, scheduler, job.method)
        if main:
            job.run.truncate_log(state.step)
        best_metrics = job.run.read_json("best_metrics.json") if state.best is not None else None
    eval_every = t.eval_every or per_epoch
    save_every = t.save_every or eval_every
    watch = Watch(state)
    if bf16 and t.bf16 == "auto" and accelerator.device.type == "cpu":  # say why, and how to turn it off
        phase("precision", f"bf16 autocast: this CPU's bf16 products run at {cpu_bf16_speedup():.1f}x fp32 "
              "(train.bf16=false trains in fp32)", t.progress and main)
    model.train()
    with Progress(total, enabled=t.progress and main) as bar:
        bar.update(state)
        while state.step < total:
            loader = _epoch_loader(job, state.epoch, accelerator)
            n_batches = len(loader)
            if state.batches_done:
                loader = accelerator.skip_first_batches(loader, state.batches_done)
            for batch in loader:
                if not _micro_step(job, model, optimizer, scheduler, accelerator, autocast, batch, state,
                                   n_batches, total):
                    continue
                bar.update(state)
                if (main or everyone) and (state.step % eval_every == 0 or state.step == total):
                    best_metrics = _evaluate(job, accelerator.unwrap_model(model), state, best_metrics, main)
                if (main or everyone) and state.step % save_every == 0 and state.step < total:
                    watch.lap()
                    save_checkpoint(job.run.checkpoint, accelerator.unwrap_model(model), optimizer,
                                    scheduler, state, job.method)
                for callback in callbacks:
                    callback(state)
                if state.step >= total:
                    break
            else:
                state.epoch, state.batches_done = state.epoch + 1, 0
    watch.lap()
    accelerator.wait_for_everyone()  # the others return only once main has saved its last evaluation
    return best_metrics, state


def _fit_directly(job: Job) -> tuple[dict | None, LoopState] | None:
    """The method's own fit (``Method.fit``) in place of the steps: logged, evaluated once, kept as best."""
    start, state = time.perf_counter(), LoopState()
    watch = Watch(state)
    found = job.method.fit(job.model, job.train_examples, job.options, job.train.seed)
    if found is None:
        return None
    state.seconds = time.perf_counter() - start
    watch.lap()
    best = None
    if is_main_process():
        job.run.append_log({"step": 0, "epoch": 0, "fit": found})
        best = _evaluate(job, job.model, state, None)
    return best, state


def _epoch_loader(job: Job, epoch: int, accelerator: Accelerator) -> DataLoader:
    return accelerator.prepare_data_loader(epoch_batches(job, epoch))


def first_batches(job: Job, n: int) -> list[dict]:
    """The first ``n`` micro-batches of the first epoch, as one process trains on them (for a start computed from
    data, ``Method.data_start``). A loader of their own, from the same seed: the run's order and the global RNG
    are left as they were."""
    return list(itertools.islice(epoch_batches(job, 0), n))


def epoch_batches(job: Job, epoch: int) -> DataLoader:
    """One process's loader of an epoch's micro-batches (``_epoch_loader`` shards it between processes)."""
    # The order depends only on (seed, epoch): a resumed run sees exactly the same batches.
    generator = torch.Generator().manual_seed(job.train.seed + epoch)
    collate_fn = job.task.collate
    if job.train.group_by_length:
        lengths = [job.task.length(e) for e in job.train_examples]
        # The loader draws its workers' base seed from ``generator`` too (else from the global RNG,
        # which would shift dropout in a resumed run).
        loader = DataLoader(job.train_examples, collate_fn=collate_fn, generator=generator,
                            batch_sampler=length_grouped_batches(lengths, job.train.batch_size, generator))
    else:
        loader = DataLoader(job.train_examples, batch_size=job.train.batch_size, shuffle=True,
                            generator=generator, collate_fn=collate_fn)
    return loader


GROUP_WINDOW = 50  # batches sorted together: homogeneous lengths, yet a different mix every epoch


def length_grouped_batches(lengths: list[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Index batches of similar length, in random order (``train.group_by_length``).

    The examples are shuffled, then sorted by length (longest first) within windows of
    ``GROUP_WINDOW`` batches, cut into batches, and the batches shuffled: each example appears
    once, each batch pads little, and the order depends only on ``generator``'s seed.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * GROUP_WINDOW
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])  # stable: ties stay shuffled
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _micro_step(job, model, optimizer, scheduler, accelerator, autocast, batch, state: LoopState,
                n_batches: int, total: int) -> bool:
    """One forward/backward; returns True when it completed an optimizer step.

    Micro-batches are grouped ``grad_accum`` at a time within an epoch (the last group may be
    smaller); each group's gradient is the mean of its micro-batch losses. ``autocast`` covers
    forward and loss only: backward runs in the precision forward chose, as torch recommends.
    """
    accum = job.train.grad_accum
    group_start = state.batches_done - state.batches_done % accum
    group_size = min(accum, n_batches - group_start)
    sync = state.batches_done + 1 == group_start + group_size
    start = time.perf_counter()
    with nullcontext() if sync else accelerator.no_sync(model):
        with autocast():
            loss_sum, count = job.task.loss(model, batch)
        all_loss, all_count, tokens = _summed_over_processes(accelerator, loss_sum.detach().float(), count,
                                                             batch["tokens"])
        micro_loss = (all_loss / max(all_count, 1)).item()  # the same in every process
        if math.isfinite(micro_loss):
            # DDP averages the processes' gradients; times P over the total count, that is the mean over all items.
            loss = loss_sum.float() * accelerator.num_processes / max(all_count, 1)
            accelerator.backward(loss / group_size)
        else:  # no backward: the step will not update the weights (or the run stops)
            _nonfinite(job, state, scheduler, f"the training loss is {micro_loss}")
            state.group_nonfinite = True
    state.batches_done += 1
    state.tokens += tokens
    state.group_loss += micro_loss / group_size
    if sync:
        norm = _grad_norm(accelerator, model, job.train.max_grad_norm)  # clips when max_grad_norm is set
        if state.group_nonfinite or not math.isfinite(norm):
            if not state.group_nonfinite:
                _nonfinite(job, state, scheduler, f"the gradient norm is {norm}")
            state.skipped += 1  # train.on_nonfinite=skip: this step leaves the weights as they were
        else:
            optimizer.step()
        job.method.after_step(accelerator.unwrap_model(model), job.options, state.step + 1, total)  # AdaLoRA's budget
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        state.group_nonfinite = False
    state.seconds += time.perf_counter() - start
    if not sync:
        return False
    state.loss, state.group_loss = state.group_loss, 0.0
    if accelerator.is_main_process:
        job.run.append_log({"step": state.step, "epoch": state.epoch, "loss": state.loss,
                            "lr": scheduler.get_last_lr()[0], "tokens": state.tokens,
                            "tokens_per_s": state.tokens / max(state.seconds, 1e-9),
                            **({"skipped": state.skipped} if state.skipped else {})})
    return True


def _grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float) -> float:
    """The global gradient norm (after DDP's averaging), clipping to ``max_norm`` when it is set."""
    if max_norm:
        return _number(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return _number(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _number(norm) -> float:
    full_tensor = getattr(norm, "full_tensor", None)  # from sharded gradients (FSDP): a DTensor, the same everywhere
    return float(full_tensor() if full_tensor else norm)


def _nonfinite(job: Job, state: LoopState, scheduler, what: str) -> None:
    """A NaN/inf loss or gradient: stop the run (``train.on_nonfinite=fail``) or let the caller skip the step."""
    if job.train.on_nonfinite == "skip":
        return
    step = state.step + 1
    raise NonFiniteError(
        f"train: {what} at step {step} (epoch {state.epoch + 1}, learning rate {scheduler.get_last_lr()[0]:.3g}); "
        f"the run stopped{_kept(job.run)}. Start a new run with a lower train.lr, gradient clipping "
        "(train.max_grad_norm, e.g. 1.0) or, to skip such steps, train.on_nonfinite=skip")


def _kept(run: RunDir) -> str:
    kept = [what for what, path in (("best delta so far (best/)", run.best), ("last checkpoint", run.checkpoint))
            if path.exists()]
    return f"; its {' and '.join(kept)} {'are' if len(kept) > 1 else 'is'} kept in {run.path}" if kept else ""


def _summed_over_processes(accelerator: Accelerator, loss_sum: torch.Tensor, count: int,
                           tokens: int) -> tuple[torch.Tensor, int, int]:
    """(loss sum, items, tokens) of this micro-step over every process: one all-reduce (none alone)."""
    if accelerator.num_processes == 1:
        return loss_sum, count, tokens
    local = torch.stack([loss_sum.double(), *(torch.tensor(float(v), dtype=torch.float64, device=loss_sum.device)
                                              for v in (count, tokens))])
    total = accelerator.reduce(local, reduction="sum")
    return total[0].float(), int(total[1]), int(total[2])


def _evaluate(job: Job, model: nn.Module, state: LoopState, best_metrics: dict | None,
              main: bool = True) -> dict | None:
    """Evaluate, log and keep the best delta; only ``main`` writes. A sharded model is evaluated by every
    process (each forward gathers the parameters from all), which then decide alike on the main one's metrics."""
    outcomes: dict = {}
    if job.task.keeps_outcomes:
        metrics = job.task.evaluate(model, job.eval_examples, outcomes)
    else:  # a task with the two-argument evaluate (a plug-in's)
        metrics = job.task.evaluate(model, job.eval_examples)
    sharded = is_sharded(model)
    if sharded:
        metrics = sharding.from_main(metrics)
    if main:
        job.run.append_log({"step": state.step, "eval": {k: v for k, v in metrics.items()
                                                         if not isinstance(v, (dict, list))}})
    value = job.task.main_metric.score(metrics)
    improved = state.best is None or value > state.best
    metric = job.task.main_metric.name
    phase("evaluation", f"step {state.step}: {metric} {metrics[metric]:.4g} on {len(job.eval_examples):,} "
                        f"examples{' (best so far)' if improved else ''}", job.train.progress and main)
    bad = [name for name, v in metrics.items() if isinstance(v, float) and math.isnan(v)]
    if not math.isfinite(value) or bad:
        name = job.task.main_metric.name if not math.isfinite(value) else bad[0]
        raise NonFiniteError(
            f"train: the evaluation at step {state.step} gave {name} = {metrics.get(name)}; the run stopped "
            f"(a run never completes with NaN metrics){_kept(job.run)}. Start a new run with a lower train.lr or "
            "gradient clipping (train.max_grad_norm, e.g. 1.0)")
    if improved:
        state.best, best_metrics = value, metrics
        full = sharding.trained_state(model) if sharded else None  # every process takes part
        if not main:
            return best_metrics
        atomic_dir(job.run.best, lambda tmp: job.method.save_delta(model, tmp, job.options, full))
        if outcomes:  # the best delta's per-example results (compare resamples them)
            atomic_write_text(job.run.path / OUTCOMES, json.dumps(outcomes))
        job.run.write_json("best_metrics.json", metrics)
    return best_metrics
