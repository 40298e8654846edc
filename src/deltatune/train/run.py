"""`deltatune train`: config -> data -> model -> method -> loop -> metrics, in a run directory.

Everything that can be checked (config, files, columns, labels) is checked before the run
directory is created, so bad input never leaves a directory behind. Once training starts,
``status.json`` tracks it; ``metrics.json`` and ``delta/`` appear only on success. The task
decides the loop: its examples through ``loop.run_loop``, or its own (``Task.loop``, PPO's rollouts).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import set_seed

from ..assets import resolve_model
from ..config import Config
from ..configure import load_config
from ..data import PreparedData
from ..errors import ConfigError, RunError
from ..eval.extras import Extras, build_extras, prompting_baselines
from ..methods import registry as methods
from ..models import count_parameters, load_tokenizer
from ..registry_db import Recording
from ..rundir import RunDir, is_main_process, new_run_dir
from ..tasks import registry as tasks
from . import ppo
from .checkpoint import LoopState
from .loop import Callback, Job, run_loop
from .session import absolute_refs, tracked, write_inputs, write_metrics

LOOPS = {"rollouts": ppo.train_ppo}  # tasks that sample their own data; the rest go through run_loop


def build_job(cfg: Config, run: RunDir | None) -> tuple[Job, PreparedData, object]:
    """Load and check data, model and method. Raises a DeltatuneError on bad input."""
    torch.set_flush_denormal(True)  # denormals make CPU steps erratic and slow
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    method = methods.get(cfg.method.name)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id)
    if cfg.data.pack and method.prepends_virtual_tokens:
        raise ConfigError([f"data.pack: {method.name} prepends virtual tokens to every row, so packed examples "
                           "would share them; turn packing off for soft-prompt methods"])
    data = task.prepare(tokenizer)  # sets task.labels
    set_seed(cfg.train.seed)
    model = task.build_model(model_path, **method.load_kwargs(cfg.method.options))
    model = method.apply(model, cfg.method.options, task)
    reference = method.untouched(model)  # still the base: the delta is at its initial value
    train_examples, eval_examples = (task.with_reference(reference, method.prepare_examples(model, split.examples))
                                     for split in (data.train, data.eval))
    job = Job(model=model, method=method, options=cfg.method.options, task=task, train_examples=train_examples,
              eval_examples=eval_examples, run=run, train=cfg.train)
    return job, data, tokenizer


def train(cfg: Config, callbacks: tuple[Callback, ...] = (), kind: str = "train", parent: str | None = None) -> RunDir:
    """``kind`` and ``parent`` are for the run registry: a tuning trial is kind "trial", its study the parent."""
    own_loop = LOOPS.get(tasks.get(cfg.task).loop)
    if own_loop:
        return own_loop(cfg, callbacks, kind, parent)
    cfg = absolute_refs(cfg)
    job, data, tokenizer = build_job(cfg, None)  # may raise: nothing written yet
    extras = build_extras(cfg, job.task, tokenizer)
    run = new_run_dir(cfg.output_dir, cfg.run_name)  # in a multi-process launch: one directory for all
    job.run = run
    if not is_main_process():  # the other processes of a launch only train; the main one writes
        run_loop(job, callbacks=callbacks)
        return run
    run.set_status("running")
    record = Recording(run.path, cfg, kind, parent)  # the run registry; a registry error only warns
    write_inputs(run, cfg, tokenizer, data.report, data.rejects,
                 {s: len(getattr(data, s).rows) for s in ("train", "eval", "test")}, data.labels)
    if data.labels and job.task.icl_baselines and cfg.eval.icl_shots:
        extras.prompting = lambda: prompting_baselines(cfg, resolve_model(cfg.model), tokenizer, data.train.rows,
                                                       data.eval.rows, data.labels)
    return _execute(job, run, resume=False, callbacks=callbacks, record=record, extras=extras)


def resume(path: str | Path, callbacks: tuple[Callback, ...] = ()) -> RunDir:
    run = RunDir(Path(path))
    if run.status() == "completed":
        raise RunError(f"{run.path}: this run already completed; nothing to resume")
    cfg = load_config(run.config)
    if tasks.get(cfg.task).loop in LOOPS:
        raise RunError(f"{run.path}: {cfg.task} runs keep no checkpoints and cannot be resumed; start a new run")
    job, data, tokenizer = build_job(cfg, run)
    extras = build_extras(cfg, job.task, tokenizer)
    extras.before = run.read_json("baseline.json").get("general_text")
    if run.read_json("data.json")["fingerprint"] != data.fingerprint:
        raise RunError(f"{run.path}: the data changed since this run started (fingerprint differs); "
                       "resuming would mix two data sets. Start a new run instead")
    if not is_main_process():
        run_loop(job, resume=True, callbacks=callbacks)
        return run
    run.set_status("running")
    return _execute(job, run, resume=True, callbacks=callbacks, record=Recording(run.path, cfg), extras=extras)


def _execute(job: Job, run: RunDir, resume: bool, callbacks, record: Recording, extras: Extras) -> RunDir:
    with tracked(run, record, resume=f"deltatune train --resume {run.path}"):
        if not resume:
            base = job.method.untouched(job.model)
            baseline = job.task.evaluate(base, job.eval_examples)
            extras.measure_before(base)
            if extras.prompting:
                run.write_json("prompting.json", extras.prompting())
            run.write_json("baseline.json", {**baseline, **({"general_text": extras.before} if extras.before else {})})
        best, state = run_loop(job, resume=resume, callbacks=callbacks)
        _finish(job, run, best, state, extras.report(job.model))
    return run


def _finish(job: Job, run: RunDir, best: dict, state: LoopState, extra: dict) -> None:
    if run.delta.exists():
        shutil.rmtree(run.delta)
    os.replace(run.best, run.delta)
    trainable, total = count_parameters(job.model)
    prompting = run.read_json("prompting.json") if (run.path / "prompting.json").is_file() else {}
    write_metrics(run, job.task, best, run.read_json("baseline.json"), trainable, total, state, **extra, **prompting)
    shutil.rmtree(run.checkpoint, ignore_errors=True)
    (run.path / "best_metrics.json").unlink(missing_ok=True)
    run.set_status("completed")
