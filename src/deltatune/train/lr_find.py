"""``train.lr: auto``: the learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training
Neural Networks", section 3.3; fastai's ``lr_find``).

From the built job (the method applied, the training examples), ``STEPS`` AdamW steps are taken with
the learning rate growing exponentially from ``LOW`` to ``HIGH`` (fastai's range); the training loss
of each batch is recorded, and the test stops once its EMA explodes (``DIVERGE`` times its minimum) or
turns NaN, usually a decade or two above the useful rates. A split with fewer batches than steps is
passed over again, each pass in a new seeded order: the test sees each rate once, so repeating examples
does not bias it the way it would a run, and fewer than ~60 points over 8 decades make the curve too
coarse to read.

The pick (``pick``): the batch losses smoothed by a centred moving average (no lag, unlike the EMA),
then the rate where that curve falls fastest against log(lr), before its minimum: large enough to
learn, short of the edge where steps overshoot. Measured on the tiny test classifier (docs/methods.md)
it gave the lowest eval loss for LoRA (0.47 against 0.65 for fastai's "minimum / 10" and 0.76 for its
"valley") and tied valley for full fine-tuning; on Houlsby adapters it took a noise dip at 7e-7 where
valley did better. Every rule's pick is saved beside the chosen one. A curve that never falls ``MIN_DROP``
below its start shows nothing to pick from: the method's default is used, and ``rule`` says so.

Afterwards the trainable weights, the buffers and every random generator are put back exactly, so
the run that follows is bit for bit the run an explicit ``train.lr=<pick>`` gives. The curve is kept
in the run (``lr_find.json``, plotted in ``lr_find.svg``); a resumed run reads its pick back from
there instead of searching again.
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import MAX_LR
from ..errors import RunError
from ..fs import atomic_write_text
from ..rundir import RunDir, barrier, is_main_process
from .checkpoint import LoopState
from .loop import Job, adamw, param_groups
from .lr_plot import lr_find_svg
from .progress import Progress

FILE, PLOT = "lr_find.json", "lr_find.svg"
STEPS = 60
LOW, HIGH = 1e-7, MAX_LR  # fastai's range; the test stops where the loss explodes, long before 10
BETA = 0.9        # EMA of the loss that decides when to stop
DIVERGE = 4.0     # stop once that EMA exceeds this many times its minimum
SKIP = 5          # ... but not in the first steps, where the EMA rests on few batches
HALF_WINDOW = 3   # the pick's centred smoothing: 7 points, about one decade
MIN_DROP = 0.05   # a curve whose minimum is not this share below its start shows nothing to pick from
RULE = "steepest"  # or "minimum/10" or "valley": all three are computed and saved


def range_test(job: Job) -> dict:
    """Search, leaving the model and every RNG as they were; returns the curve and the pick."""
    low, high = LOW, HIGH
    rates = [low * (high / low) ** (i / max(STEPS - 1, 1)) for i in range(STEPS)]
    with _restored(job.model):
        points, stopped = _sweep(job, rates)
    chosen, rule = pick(points, RULE), RULE
    if not math.isfinite(chosen):
        chosen, rule = job.method.default_lr, "no descent in the curve: the method's default"
    others = {f"{name.replace('/', '_over_')}_lr": _finite(pick(points, name))
              for name in ("steepest", "minimum/10", "valley")}
    return {"lr": chosen, "rule": rule, **others, "range": [low, high], "steps": len(points),
            "stopped": stopped, "method": job.method.name, "default_lr": job.method.default_lr,
            "points": [{**p, "smoothed": s} for p, s in zip(points, smooth([p["loss"] for p in points]))]}


def _sweep(job: Job, rates: list[float]) -> tuple[list[dict], str]:
    """One step at each rate; the points (lr, loss, smoothed) and why it stopped."""
    model, t = job.model, job.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(param_groups(model, job.method, job.options, 1.0, t.weight_decay), lr=1.0)
    scales = [group["lr"] for group in optimizer.param_groups]  # a method's own ratios (LoRA+) stay
    batches, points, average, lowest = _batches(job), [], 0.0, math.inf
    state, stopped = LoopState(), "finished"
    model.train()
    with Progress(len(rates), enabled=t.progress, label="lr range test") as bar:
        for i, lr in enumerate(rates):
            start = time.perf_counter()
            for group, scale in zip(optimizer.param_groups, scales):
                group["lr"] = lr * scale
            loss_sum, count = job.task.loss(model, next(batches))
            loss = loss_sum.float() / max(count, 1)
            value = loss.item()
            if not math.isfinite(value):
                stopped = f"the loss became {value} at lr {lr:.3g}"
                break
            loss.backward()
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            average = BETA * average + (1 - BETA) * value
            smoothed = average / (1 - BETA ** (i + 1))
            points.append({"lr": lr, "loss": value, "ema": smoothed})
            lowest = min(lowest, smoothed)
            state.step, state.loss, state.seconds = i + 1, smoothed, state.seconds + time.perf_counter() - start
            bar.update(state)
            if i >= SKIP and smoothed > DIVERGE * lowest:
                stopped = f"the smoothed loss exceeded {DIVERGE:g}x its minimum at lr {lr:.3g}"
                break
    return points, stopped


def _batches(job: Job) -> Iterator[dict]:
    """Training batches without end: passes over the split in seeded orders of their own (the run's
    own order comes from other generators, and the global RNG is restored afterwards anyway)."""
    if not job.train_examples:
        raise RunError("train.lr: auto: the training split is empty, so there is nothing to search on")
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(job.train.seed + 7919 * (epoch + 1))
        yield from DataLoader(job.train_examples, batch_size=job.train.batch_size, shuffle=True,
                              generator=generator, collate_fn=job.task.collate)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def smooth(losses: list[float], half: int = HALF_WINDOW) -> list[float]:
    """Centred moving average (the window shrinks at the ends): no lag, unlike the EMA that decides when
    to stop, so the pick is not shifted towards larger rates."""
    return [float(np.mean(losses[max(0, i - half):i + half + 1])) for i in range(len(losses))]


def pick(points: list[dict], rule: str) -> float:
    """The chosen rate from the centred smoothing of the batch losses, or NaN where the curve shows no
    descent to judge by (its minimum less than ``MIN_DROP`` below where it started: the rates searched
    all trained about equally badly, or the loss diverged at once).

    ``steepest``: where the curve falls fastest against log(lr), before its minimum. ``minimum/10``: a
    tenth of the rate at its minimum. ``valley`` (fastai's default since 2021): the middle of the
    longest run of ever lower losses."""
    curve = smooth([p["loss"] for p in points])
    if len(points) < 3 or min(curve) > (1 - MIN_DROP) * curve[0]:
        return math.nan
    lowest = int(np.argmin(curve))
    if rule == "minimum/10":
        return points[lowest]["lr"] / 10
    if rule == "valley":
        start, end = _longest_descent(curve)
        return points[start + (end - start) // 2]["lr"]
    slopes = np.gradient(np.array(curve), np.log10([p["lr"] for p in points]))
    return float(points[int(np.argmin(slopes[:max(lowest, 1)]))]["lr"])


def _longest_descent(curve: list[float]) -> tuple[int, int]:
    """First and last index of the longest subsequence of strictly falling values (fastai's valley)."""
    length, before = [1] * len(curve), list(range(len(curve)))
    for i in range(1, len(curve)):
        for j in range(i):
            if curve[i] < curve[j] and length[j] + 1 > length[i]:
                length[i], before[i] = length[j] + 1, j
    end = int(np.argmax(length))
    start = end
    while before[start] != start:
        start = before[start]
    return start, end


@contextmanager
def _restored(model: nn.Module) -> Iterator[None]:
    """Put back, on leaving, the trainable weights, the buffers, the train/eval modes and the Python,
    NumPy and torch random generators, exactly (frozen weights never change: nothing updates them)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in params:
                    p.copy_(params[name])
                    p.grad = None
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for module, training in modes.items():
            module.training = training
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def settle_lr(job: Job, run: RunDir) -> dict | None:
    """For ``train.lr: auto``: the pick, searched now and saved (curve and plot), or read back from
    ``lr_find.json`` if this run searched already (a resume, whose config may already hold the number);
    ``job.train.lr`` becomes it. None for a run that never searched. In a multi-process launch every
    process calls this: the main one searches, the others wait for it and read its pick."""
    t, file = job.train, run.path / FILE
    if t.lr == "auto":
        if is_main_process() and not file.is_file():
            found = range_test(job)
            run.write_json(FILE, found)
            atomic_write_text(run.path / PLOT, lr_find_svg(found))
            print(f"train.lr: auto: {found['lr']:.3g} (range test, rule: {found['rule']}; curve in {run.path / PLOT})",
                  file=sys.stderr)
        barrier()
    if not file.is_file():
        return None
    found = run.read_json(FILE)
    t.lr = float(found["lr"])
    return found
