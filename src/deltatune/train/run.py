"""`deltatune train`: config -> data -> model -> method -> loop -> metrics, in a run directory.

Everything that can be checked (config, files, columns, labels) is checked before the run
directory is created, so bad input never leaves a directory behind. Once training starts,
``status.json`` tracks it; ``metrics.json`` and ``delta/`` appear only on success.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import shutil
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from transformers import set_seed

from .. import __version__
from ..assets import resolve_model
from ..config import Config, dump_yaml, load_config
from ..data import PreparedData, prepare
from ..data.report import render_html
from ..errors import ConfigError, RunError, Stopped
from ..eval.evaluate import evaluate
from ..eval.extras import Extras, build_extras, prompting_baselines
from ..methods import registry
from ..models import count_parameters, load_model, load_tokenizer
from ..registry_db import Recording
from ..rundir import RunDir, is_main_process, new_run_dir
from ..tasks import registry as tasks
from .checkpoint import LoopState
from .loop import Callback, Job, run_loop


def absolute_refs(cfg: Config) -> Config:
    """Local paths made absolute, so the saved config works from any directory."""
    def fix(ref: str | None) -> str | None:
        return str(Path(ref).expanduser().resolve()) if ref and Path(ref).expanduser().exists() else ref

    data = dataclasses.replace(cfg.data, train=fix(cfg.data.train), eval=fix(cfg.data.eval), test=fix(cfg.data.test))
    return dataclasses.replace(cfg, model=fix(cfg.model), data=data)


def build_job(cfg: Config, run: RunDir | None) -> tuple[Job, PreparedData, object]:
    """Load and check data, model and method. Raises a DeltatuneError on bad input."""
    torch.set_flush_denormal(True)  # denormals make CPU steps erratic and slow
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    method = registry.get(cfg.method.name)
    if cfg.data.pack and method.prepends_virtual_tokens:
        raise ConfigError([f"data.pack: {method.name} prepends virtual tokens to every row, so packed examples "
                           "would share them; turn packing off for soft-prompt methods"])
    data = prepare(cfg, tokenizer)
    set_seed(cfg.train.seed)
    model = load_model(model_path, cfg.task, data.labels, tokenizer.pad_token_id,
                       **method.load_kwargs(cfg.method.options))
    model = method.apply(model, cfg.method.options, tasks.get(cfg.task))
    train_examples = method.prepare_examples(model, data.train.examples)
    eval_examples = method.prepare_examples(model, data.eval.examples)
    if cfg.task == "dpo":  # the reference runs here, once: the model is still the base
        from ..rlhf.dpo import add_reference_logps

        reference = partial(add_reference_logps, method.untouched(model), batch_size=cfg.train.eval_batch_size,
                            pad_id=tokenizer.pad_token_id, chunked=cfg.train.chunked_loss)
        train_examples, eval_examples = reference(train_examples), reference(eval_examples)
    job = Job(model=model, method=method, options=cfg.method.options, task=cfg.task,
              train_examples=train_examples, eval_examples=eval_examples,
              labels=data.labels, pad_id=tokenizer.pad_token_id, run=run, train=cfg.train)
    return job, data, tokenizer


def train(cfg: Config, callbacks: tuple[Callback, ...] = (), kind: str = "train", parent: str | None = None) -> RunDir:
    """``kind`` and ``parent`` are for the run registry: a tuning trial is kind "trial", its study the parent."""
    if cfg.task == "ppo":  # sampling, not a pass over fixed examples: its own loop
        from ..rlhf.ppo import train_ppo

        return train_ppo(cfg, callbacks, kind, parent)
    cfg = absolute_refs(cfg)
    job, data, tokenizer = build_job(cfg, None)  # may raise: nothing written yet
    extras = build_extras(cfg, tokenizer)
    run = new_run_dir(cfg.output_dir, cfg.run_name)  # in a multi-process launch: one directory for all
    job.run = run
    if not is_main_process():  # the other processes of a launch only train; the main one writes
        run_loop(job, callbacks=callbacks)
        return run
    run.set_status("running")
    record = Recording(run.path, cfg, kind, parent)  # the run registry; a registry error only warns
    run.config.write_text(dump_yaml(cfg), encoding="utf-8")
    tokenizer.save_pretrained(run.tokenizer)
    if data.labels:
        run.write_json("labels.json", {"labels": data.labels})
    run.write_json("data.json", {"fingerprint": data.fingerprint, "mode": data.mode,
                                 "train_rows": len(data.train.rows), "eval_rows": len(data.eval.rows),
                                 "test_rows": len(data.test.rows), "train": cfg.data.train, "eval": cfg.data.eval})
    run.write_json("data_report.json", data.report)
    (run.path / "data_report.html").write_text(render_html(data.report), encoding="utf-8")
    if data.rejects:
        run.write_jsonl("rejects.jsonl", data.rejects)
    run.write_json("env.json", environment())
    if data.labels and cfg.task == "classification" and cfg.eval.icl_shots:
        extras.prompting = lambda: prompting_baselines(cfg, resolve_model(cfg.model), tokenizer, data.train.rows,
                                                       data.eval.rows, data.labels)
    return _execute(job, data, run, resume=False, callbacks=callbacks, record=record, extras=extras)


def resume(path: str | Path, callbacks: tuple[Callback, ...] = ()) -> RunDir:
    run = RunDir(Path(path))
    if run.status() == "completed":
        raise RunError(f"{run.path}: this run already completed; nothing to resume")
    cfg = load_config(run.config)
    if cfg.task == "ppo":
        raise RunError(f"{run.path}: PPO runs keep no checkpoints and cannot be resumed; start a new run")
    job, data, tokenizer = build_job(cfg, run)
    extras = build_extras(cfg, tokenizer)
    extras.before = run.read_json("baseline.json").get("general_text")
    if run.read_json("data.json")["fingerprint"] != data.fingerprint:
        raise RunError(f"{run.path}: the data changed since this run started (fingerprint differs); "
                       "resuming would mix two data sets. Start a new run instead")
    if not is_main_process():
        run_loop(job, resume=True, callbacks=callbacks)
        return run
    run.set_status("running")
    return _execute(job, data, run, resume=True, callbacks=callbacks, record=Recording(run.path, cfg),
                    extras=extras)


def _execute(job: Job, data: PreparedData, run: RunDir, resume: bool, callbacks, record: Recording,
             extras: Extras) -> RunDir:
    batch, pad, chunked = job.train.eval_batch_size, job.pad_id, job.train.chunked_loss
    with tracked(run, record, resume=f"deltatune train --resume {run.path}"):
        if not resume:
            base = job.method.untouched(job.model)
            baseline = evaluate(base, job.eval_examples, job.task, batch, pad, job.labels, chunked)
            extras.measure_before(base, batch, pad, chunked)
            if extras.prompting:
                run.write_json("prompting.json", extras.prompting())
            run.write_json("baseline.json", {**baseline, **({"general_text": extras.before} if extras.before else {})})
        best, state = run_loop(job, resume=resume, callbacks=callbacks)
        _finish(job, run, best, state, extras.report(job.model, batch, pad, chunked))
    return run


@contextmanager
def tracked(run: RunDir, record: Recording, **interrupted) -> Iterator[None]:
    """The run's status.json and registry record follow how the block ends: completed, interrupted
    (``interrupted`` says how to go on), stopped on purpose (e.g. pruned) or failed with the error."""
    try:
        yield
    except KeyboardInterrupt:
        run.set_status("interrupted", **interrupted)
        record.end("interrupted")
        raise
    except Stopped as exc:
        run.set_status(exc.status, reason=str(exc))
        record.end(exc.status, error=str(exc))
        raise
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        run.set_status("failed", error=error)
        record.end("failed", error=error)
        raise
    record.end("completed")  # reads metrics.json, env.json, data.json and delta/ from the run directory


def _finish(job: Job, run: RunDir, best: dict, state: LoopState, extra: dict) -> None:
    if run.delta.exists():
        shutil.rmtree(run.delta)
    os.replace(run.best, run.delta)
    trainable, total = count_parameters(job.model)
    run.write_json("metrics.json", {
        "eval": best,
        "baseline": run.read_json("baseline.json"),
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(state.seconds, 3),
        "tokens_per_s": round(state.tokens / max(state.seconds, 1e-9), 1),
        "steps": state.step,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "data_fingerprint": run.read_json("data.json")["fingerprint"],
        **extra,
        **(run.read_json("prompting.json") if (run.path / "prompting.json").is_file() else {}),
    })
    shutil.rmtree(run.checkpoint, ignore_errors=True)
    (run.path / "best_metrics.json").unlink(missing_ok=True)
    run.set_status("completed")


def environment() -> dict:
    """Versions of the libraries as imported (local builds included) and the thread count: env.json."""
    import accelerate
    import peft
    import transformers

    return {"deltatune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "machine": platform.machine(),
            "threads": torch.get_num_threads()}
