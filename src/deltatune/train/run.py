"""`deltatune train`: config -> data -> model -> method -> loop -> metrics, in a run directory.

Everything that can be checked (config, files, columns, labels) is checked before the run
directory is created, so bad input never leaves a directory behind. Once training starts,
``status.json`` tracks it; ``metrics.json`` and ``delta/`` appear only on success. The task
decides the loop: its examples through ``loop.run_loop``, or its own (``Task.loop``: PPO's rollouts and GRPO's
groups, through ``online``); both checkpoint, and ``resume`` goes on with either.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import set_seed

from ..assets import resolve_model
from ..config import Config, dump_yaml
from ..configure import load_config
from ..data import PreparedData
from ..errors import ConfigError, RunError
from ..fs import atomic_write_text, fsync_dir
from ..kernels import fuse
from ..allocator import return_freed_memory
from ..eval.extras import Extras, build_extras, prompting_baselines
from ..methods import registry as methods
from ..models import count_parameters, load_tokenizer
from ..registry_db import Recording
from ..rundir import RunDir, barrier, is_main_process, new_run_dir
from ..tasks import registry as tasks
from . import lr_find, online, sharding
from .data_start import settle_start
from .grpo import GRPO
from .checkpoint import LoopState
from .loop import Callback, Job, run_loop
from .ppo import PPO
from .progress import phase
from .session import absolute_refs, finish, recover, refuse_changed_data, tracked, write_inputs, write_metrics

LOOPS = {"rollouts": PPO, "groups": GRPO}  # tasks that sample their own data (``online``); the rest: run_loop


def build_job(cfg: Config, run: RunDir | None) -> tuple[Job, PreparedData, object]:
    """Load and check data, model and method. Raises a DeltatuneError on bad input."""
    torch.set_flush_denormal(True)  # denormals make CPU steps erratic and slow
    if cfg.train.return_freed_memory:  # before loading: what loading frees goes back too
        return_freed_memory()
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    method = methods.get(cfg.method.name)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id)
    if cfg.data.pack and method.prepends_virtual_tokens:
        raise ConfigError([f"data.pack: {method.name} prepends virtual tokens to every row, so packed examples "
                           "would share them; turn packing off for soft-prompt methods"])
    shown = cfg.train.progress
    phase("data", f"preparing {cfg.data.train} for {cfg.task}", shown)
    data = task.prepare(tokenizer)  # sets task.labels
    phase("data", f"{len(data.train.examples):,} training and {len(data.eval.examples):,} evaluation examples", shown)
    set_seed(cfg.train.seed)
    phase("loading", f"model {cfg.model} with {method.name}", shown)
    model = task.build_model(model_path, **method.load_kwargs(cfg.method.options))
    model = method.apply(model, cfg.method.options, task)
    fuse(model, cfg.train.kernels)
    reference = method.untouched(model)  # still the base: the delta is at its initial value
    train_examples, eval_examples = (task.with_reference(reference, method.prepare_examples(model, split.examples))
                                     for split in (data.train, data.eval))
    job = Job(model=model, method=method, options=cfg.method.options, task=task, train_examples=train_examples,
              eval_examples=eval_examples, run=run, train=cfg.train)
    return job, data, tokenizer


def train(cfg: Config, callbacks: tuple[Callback, ...] = (), kind: str = "train", parent: str | None = None) -> RunDir:
    """``kind`` and ``parent`` are for the run registry: a tuning trial is kind "trial", its study the parent."""
    own_loop = LOOPS.get(tasks.get(cfg.task).loop)
    _refuse_under_fsdp(cfg, own_loop)
    if own_loop:
        return online.train(own_loop, cfg, callbacks, kind, parent)
    cfg = absolute_refs(cfg)
    job, data, tokenizer = build_job(cfg, None)  # may raise: nothing written yet
    extras = build_extras(cfg, job.task, tokenizer)
    run = new_run_dir(cfg.output_dir, cfg.run_name)  # in a multi-process launch: one directory for all
    job.run = run
    if not is_main_process():  # the other processes of a launch only train; the main one writes
        settle_start(job, run)
        lr_find.settle_lr(job, run)
        run_loop(job, callbacks=callbacks)
        return run
    return _start(cfg, job, data, tokenizer, extras, Recording(run.path, cfg, kind, parent), callbacks)


def resume(path: str | Path, callbacks: tuple[Callback, ...] = ()) -> RunDir:
    """Go on with a run that stopped (interrupted, failed or killed at any moment): from its last
    checkpoint, or from its first step if it stopped before one; the result equals an uninterrupted
    run's. A run that a crash stopped after its commit record (metrics.json) is only completed."""
    run = RunDir(Path(path))
    status = run.status()
    if status == "completed":
        raise RunError(f"{run.path}: this run already completed; nothing to resume")
    if status == "running" and run.alive():
        state = run.read_json("status.json")
        raise RunError(f"{run.path}: this run is still training (process {state.get('pid', '?')} on "
                       f"{state.get('host', 'another machine')}); two processes must never write one run: "
                       "stop it first (Ctrl-C), then resume")
    if not run.config.is_file():
        raise RunError(f"{run.path}: no config.yaml, so no run to resume (a run writes it first; is this a "
                       "deltatune run directory?); start one with deltatune train")
    cfg = load_config(run.config)
    if is_main_process():
        recover(run)
    barrier()  # in a multi-process launch the others read the folder once the main process recovered it
    if run.complete():  # a crash cut the finish short after its commit record
        if is_main_process():
            finish(run, Recording(run.path, cfg))
        return run
    own_loop = LOOPS.get(tasks.get(cfg.task).loop)
    _refuse_under_fsdp(cfg, own_loop)
    if own_loop:
        return online.resume(own_loop, run, cfg, callbacks)
    job, data, tokenizer = build_job(cfg, run)
    extras = build_extras(cfg, job.task, tokenizer)
    refuse_changed_data(run, data.fingerprint)
    from_checkpoint = (run.checkpoint / "state.json").is_file()
    settle_start(job, run)  # read back from the run: the same start (EVA's per-layer ranks) as before
    lr_find.settle_lr(job, run)  # an auto run's pick, read back (searched only if it stopped before that)
    if not is_main_process():
        run_loop(job, resume=from_checkpoint, callbacks=callbacks)
        return run
    record = Recording(run.path, cfg)
    if not from_checkpoint:  # stopped before its first checkpoint: start again, in the same directory
        run.log.unlink(missing_ok=True)
        return _start(cfg, job, data, tokenizer, extras, record, callbacks)
    run.mark_running()
    extras.before = run.read_json("baseline.json").get("general_text")
    with tracked(run, record, resume=f"deltatune train --resume {run.path}"):
        best, state = run_loop(job, resume=True, callbacks=callbacks)
        _finish(job, run, best, state, extras.report(job.model), record)
    return run


def _refuse_under_fsdp(cfg: Config, own_loop) -> None:
    found = sharding.problems(own_loop is not None, cfg.eval.forgetting and tasks.get(cfg.task).measures_forgetting)
    if found:
        raise ConfigError(found)


def _start(cfg: Config, job: Job, data: PreparedData, tokenizer, extras: Extras, record: Recording,
           callbacks) -> RunDir:
    """A run from its first step: its inputs and baseline written, then the loop."""
    run = job.run
    with tracked(run, record, resume=f"deltatune train --resume {run.path}"):
        write_inputs(run, cfg, tokenizer, data.report, data.rejects,
                     {s: len(getattr(data, s).rows) for s in ("train", "eval", "test")}, data.labels)
        settle_start(job, run)  # a start from the training data (LoRA's EVA), before the range test probes it
        if lr_find.settle_lr(job, run):  # train.lr: auto; the config records the rate the run trains at
            atomic_write_text(run.config, dump_yaml(cfg))
        base = job.method.untouched(job.model)
        phase("baseline", f"the model before training, on {len(job.eval_examples):,} evaluation examples",
              cfg.train.progress)
        baseline = job.task.evaluate(base, job.eval_examples)
        extras.measure_before(base)
        if data.labels and job.task.icl_baselines and cfg.eval.icl_shots:
            run.write_json("prompting.json", prompting_baselines(cfg, resolve_model(cfg.model), tokenizer,
                                                                 data.train.rows, data.eval.rows, data.labels))
        run.write_json("baseline.json", {**baseline, **({"general_text": extras.before} if extras.before else {})})
        best, state = run_loop(job, callbacks=callbacks)
        _finish(job, run, best, state, extras.report(job.model), record)
    return run


def _finish(job: Job, run: RunDir, best: dict, state: LoopState, extra: dict, record: Recording) -> None:
    """The best delta becomes the run's delta, then the commit record: metrics.json."""
    phase("saving", str(run.path), job.train.progress)
    os.replace(run.best, run.delta)  # resume (session.recover) puts it back if a crash comes before metrics.json
    fsync_dir(run.path)
    trainable, total = count_parameters(job.model)
    prompting = run.read_json("prompting.json") if (run.path / "prompting.json").is_file() else {}
    lr = {"lr": job.train.lr, "lr_source": job.train.lr_source}
    if (run.path / lr_find.FILE).is_file():
        lr["lr_found"] = run.read_json(lr_find.FILE)["lr"]
    write_metrics(run, job.task, best, run.read_json("baseline.json"), trainable, total, state, **extra, **prompting,
                  **lr)
    finish(run, record)
