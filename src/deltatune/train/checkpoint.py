"""Resumable checkpoints: trainable tensors, optimizer moments, schedule, RNG, loop position and what the method
keeps while it trains (``Method.loop_state``); a loop of its own (train/online.py: PPO, GRPO) adds its own state
as ``extra`` (JSON) and ``extra_tensors``, read back with ``read_extra``.

Stored as safetensors plus JSON (nothing is unpickled on load) and committed by ``fs.atomic_dir``:
a crash while saving leaves the previous checkpoint or the new one, never half of one. A model sharded
by FSDP saves the same files as one process (its tensors gathered: every process calls ``save_checkpoint``,
the main one writes) and loads them into each process's shards, so a checkpoint does not depend on how
many processes wrote it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RunError
from ..fs import atomic_dir
from ..methods.base import Method
from ..models import is_sharded
from ..rundir import is_main_process
from . import sharding

METHOD_STATE = "method_state.safetensors"
EXTRA_TENSORS = "extra.safetensors"


@dataclass
class LoopState:
    step: int = 0            # optimizer steps done
    epoch: int = 0           # current epoch
    batches_done: int = 0    # micro-batches consumed in the current epoch
    best: float | None = None  # best evaluation score so far (higher is better)
    tokens: int = 0          # real tokens trained on so far
    seconds: float = 0.0     # training time so far (excludes evaluation)
    loss: float | None = None  # training loss of the last optimizer step
    group_loss: float = 0.0  # loss accumulated over the current accumulation group
    group_nonfinite: bool = False  # a micro-batch of the current group had a NaN/inf loss
    skipped: int = 0         # optimizer steps skipped for a NaN/inf loss or gradient (train.on_nonfinite=skip)
    other_cpu_seconds: float = 0.0  # CPU time other processes used while the loop ran (machine_load.Watch)
    watched_seconds: float = 0.0    # wall time that was watched


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    state: LoopState, method: Method | None = None, extra: dict | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """``scheduler`` may be None (a constant rate). A sharded model's processes all call it; the main one writes."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if is_sharded(model):
        full, opt = sharding.trained_state(model), sharding.optimizer_state(model, optimizer)  # every process
        if not is_main_process():
            return
        params = {n: full[n].contiguous() for n in trainable}
    else:
        params, opt = {n: p.detach().contiguous() for n, p in trainable.items()}, optimizer.state_dict()
    tensors, meta = {}, {}
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
            else:
                meta[f"{index}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    kept = {k: v.contiguous() for k, v in method.loop_state(model).items()} if method else {}

    def write(tmp: Path) -> None:
        save_file(params, tmp / "trainable.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        if kept:
            save_file(kept, tmp / METHOD_STATE)
        if extra_tensors:
            save_file({k: v.contiguous() for k, v in extra_tensors.items()}, tmp / EXTRA_TENSORS)
        (tmp / "state.json").write_text(json.dumps({
            "loop": asdict(state), "param_groups": opt["param_groups"], "optimizer_scalars": meta,
            "scheduler": scheduler.state_dict() if scheduler else None, **({"extra": extra} if extra else {})},
            indent=1))

    atomic_dir(path, write)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    method: Method | None = None) -> LoopState:
    try:
        state = _load(path, model, optimizer, scheduler)
        if method:
            method.load_loop_state(model, load_file(path / METHOD_STATE) if (path / METHOD_STATE).is_file() else {})
        return state
    except (OSError, ValueError, KeyError, SafetensorError) as exc:  # a damaged disk or a hand-edited file
        raise _damaged(path, exc) from exc


def read_extra(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """What ``save_checkpoint`` was given as ``extra`` and ``extra_tensors`` (empty where it was given none)."""
    try:
        extra = json.loads((path / "state.json").read_text()).get("extra", {})
        return extra, load_file(path / EXTRA_TENSORS) if (path / EXTRA_TENSORS).is_file() else {}
    except (OSError, ValueError, SafetensorError) as exc:
        raise _damaged(path, exc) from exc


def _damaged(path: Path, exc: Exception) -> RunError:
    return RunError(f"{path}: the checkpoint cannot be read ({type(exc).__name__}: {exc}); it is damaged. "
                    f"Remove the folder {path} and resume again: the run then starts over from its first "
                    "step, which gives the same result")


def _load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> LoopState:
    params = load_file(path / "trainable.safetensors")
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(own):
        raise RunError(f"{path}: checkpoint tensors do not match the model's trainable parameters")
    if is_sharded(model):
        sharding.load_trained(model, params)
    else:
        with torch.no_grad():
            for name, value in params.items():
                own[name].copy_(value)
    info = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(tensors.pop("rng.torch"))
    slots: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(info["optimizer_scalars"].items()):
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    opt = {"state": slots, "param_groups": info["param_groups"]}
    if is_sharded(model):
        sharding.load_optimizer(model, optimizer, opt)
    else:
        optimizer.load_state_dict(opt)
    if scheduler:
        scheduler.load_state_dict(info["scheduler"])
    return LoopState(**info["loop"])
