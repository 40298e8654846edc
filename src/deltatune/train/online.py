"""The loop of the tasks that sample their own training data (PPO: train/ppo.py, GRPO: train/grpo.py), written
once: the set-up and recording of a run, the iterations, checkpoints and ``--resume``, and the finish. An
``Algorithm`` says what differs: how it samples, scores and updates, evaluates, and saves its delta.

Each iteration takes the next ``per_step`` prompts of a stream whose order depends only on (seed, epoch), and
the algorithm samples, scores and updates on them (``Algorithm.iteration``). Every ``train.save_every``
iterations (0: once per pass over the training prompts) a checkpoint keeps all that the later iterations
depend on: the trainable tensors (the delta; PPO's value head), AdamW's moments, the RNG states (torch's, which
sampling draws from; the generator of the minibatch order; python's and numpy's, for reward functions that
draw), the algorithm's own state (PPO's adaptive KL coefficient), the loop's position and the config it trains
with. The prompt position follows from the step. So ``deltatune train --resume RUN`` samples and updates exactly
as the uninterrupted run would have: same log, same delta, bit for bit. The reference (the delta switched off)
and the reward models are never trained, so there is nothing of theirs to keep.

Before the run directory exists, the starting policy is scored on the held-out prompts (a broken reward fails
there): that is metrics.json's "before", kept in ``baseline.json``, and ``samples.jsonl`` holds its responses
until the finish adds the final policy's.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import yaml
from accelerate import PartialState
from torch import nn
from transformers import set_seed

from ..assets import resolve_model
from ..config import Config, to_dict
from ..data.prepare import PreparedRows
from ..errors import ConfigError, DeltatuneError, RunError
from ..kernels import fuse
from ..allocator import return_freed_memory
from ..methods import registry as methods
from ..models import count_parameters, load_tokenizer
from ..registry_db import Recording
from ..rlhf.rollout import Policy
from ..rundir import RunDir, distributed, new_run_dir
from ..tasks import registry as tasks
from ..tasks.base import Task
from .checkpoint import LoopState, load_checkpoint, read_extra, save_checkpoint
from .progress import Progress
from .session import absolute_refs, finish, refuse_changed_data, tracked, write_inputs, write_metrics

Sample = tuple[str, object, object]  # a held-out prompt, its response (or group of completions) and reward(s)
R = TypeVar("R")  # an algorithm's reward: PPO's one function, GRPO's weighted sources


class Algorithm:
    """What differs between PPO and GRPO, for one run: ``build`` checks the config and loads the policy and the
    rewards; the loop, checkpoints and recording are this module's."""
    name = ""        # for messages: "PPO"

    def __init__(self, cfg: Config, task: Task, policy: Policy, rows: PreparedRows):
        self.cfg, self.task, self.policy, self.rows = cfg, task, policy, rows

    @classmethod
    def build(cls, cfg: Config) -> "Algorithm":
        raise NotImplementedError

    @staticmethod
    def absolute_refs(cfg: Config) -> Config:
        """The reward files and runs as absolute paths, so the saved config works from any directory."""
        return cfg

    @property
    def per_step(self) -> int:
        """Prompts an iteration takes."""
        raise NotImplementedError

    def items(self, split: str) -> list:
        """The prompts of a split, as ``iteration`` takes them."""
        raise NotImplementedError

    def trainable(self) -> nn.Module:
        """The module whose trainable parameters are the run's: what checkpoints keep."""
        return self.policy.model

    def optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def iteration(self, items: list, optimizer, generator: torch.Generator) -> tuple[dict, int]:
        """Sample, score and update on ``items``: the log record (with ``reward`` and ``loss``) and the number of
        tokens sampled."""
        raise NotImplementedError

    def evaluate(self) -> tuple[dict, list[Sample]]:
        """The policy on the held-out prompts, sampled from a fixed seed (``fixed_draws``): metrics and samples."""
        raise NotImplementedError

    def save_delta(self, path: Path) -> None:
        raise NotImplementedError

    def results(self, state: LoopState) -> dict:
        """What the algorithm adds to metrics.json."""
        return {}

    def state_dict(self) -> dict:
        """What the algorithm itself keeps from one iteration to the next (JSON), for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ----------------------------------------------------------------------------- what both algorithms call

def load_inputs(cfg: Config, problems: list[str], load_reward: Callable[[Config], R]) -> tuple[R, object, Task,
                                                                                             PreparedRows]:
    """What fails cheaply, before a model loads: the algorithm's section's ``problems`` (checked again here: cfg
    may not have come through configure.load_config) refused, then its reward(s) (``load_reward``), then the
    tokenizer, the task and the prompt rows (``load_prompts``)."""
    if problems:
        raise ConfigError(problems)
    reward = load_reward(cfg)
    return (reward, *load_prompts(cfg))


def load_prompts(cfg: Config) -> tuple[object, Task, PreparedRows]:
    """The tokenizer, the task and the prompt rows (through the usual pipeline: templates, cleaning, dedup,
    split, limits). Refuses a multi-process launch first."""
    if distributed():
        raise DeltatuneError(f"task {cfg.task} runs in one process (its sampled data are not sharded across "
                             "processes); start it with `deltatune train`, not a multi-process launch")
    torch.set_flush_denormal(True)
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id)
    return tokenizer, task, task.rows()


def load_policy_model(cfg: Config, task: Task) -> nn.Module:
    """The base model with the method's delta, seeded, on the device, dropout off (the policy that samples and
    the one updated then agree: the first minibatch's ratios are 1)."""
    method = methods.get(cfg.method.name)
    if cfg.train.return_freed_memory:  # before loading: what loading frees goes back too
        return_freed_memory()
    set_seed(cfg.train.seed)
    model = task.build_model(resolve_model(cfg.model), **method.load_kwargs(cfg.method.options))
    model = method.apply(model, cfg.method.options, task).to(PartialState().device)
    fuse(model, cfg.train.kernels)
    return model.eval()


def prompt_stream(prompts: list, seed: int, skip: int = 0) -> Iterator:
    """The prompts in a fresh order every epoch, from the ``skip``-th on; the order depends only on (seed, epoch)."""
    epoch, start = divmod(skip, len(prompts))
    while True:
        order = list(prompts)
        random.Random(seed + epoch).shuffle(order)
        yield from order[start:]
        epoch, start = epoch + 1, 0


def fixed_draws(seed: int, collect: Callable, batches: list) -> list:
    """``collect`` of each batch with torch's RNG seeded to ``seed`` and put back afterwards: the same draws
    before and after training, and none taken from the training's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [collect(batch) for batch in batches]


def minibatch_steps(optimizer, n: int, minibatch: int, epochs: int, max_grad_norm: float,
                    generator: torch.Generator, losses: Callable[[torch.Tensor], dict]) -> dict[str, float]:
    """``epochs`` passes over ``n`` sampled items in random minibatches, one AdamW step each; ``losses(index)``
    gives the minibatch's ``loss`` to minimise and what else to log. Returns the mean of each."""
    params = [x for group in optimizer.param_groups for x in group["params"]]
    stats = defaultdict(list)
    for _ in range(epochs):
        for index in torch.randperm(n, generator=generator).split(minibatch):
            values = losses(index)
            optimizer.zero_grad(set_to_none=True)
            values["loss"].backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            for key, value in values.items():
                stats[key].append(value.item())
    return {key: sum(values) / len(values) for key, values in stats.items()}


# ----------------------------------------------------------------------------- a run

def train(algorithm_class: type[Algorithm], cfg: Config, callbacks=(), kind: str = "train",
          parent: str | None = None) -> RunDir:
    """Train a policy; returns the completed run directory. Bad input raises before one exists."""
    cfg = absolute_refs(algorithm_class.absolute_refs(cfg))
    algorithm = algorithm_class.build(cfg)
    before = algorithm.evaluate()  # may raise (a broken reward): nothing written yet
    run = new_run_dir(cfg.output_dir, cfg.run_name)
    return _start(algorithm, run, Recording(run.path, cfg, kind, parent), before, callbacks)


def resume(algorithm_class: type[Algorithm], run: RunDir, cfg: Config, callbacks=()) -> RunDir:
    """Go on from the last checkpoint of a run that stopped (``train.run.resume`` has checked and recovered its
    directory), or start it again in its directory if it stopped before one."""
    from_checkpoint = (run.checkpoint / "state.json").is_file()
    if from_checkpoint:
        _refuse_changed_config(run, cfg)
    algorithm = algorithm_class.build(cfg)
    refuse_changed_data(run, algorithm.rows.report["fingerprint"])
    record = Recording(run.path, cfg)
    if not from_checkpoint:
        run.log.unlink(missing_ok=True)
        return _start(algorithm, run, record, algorithm.evaluate(), callbacks)
    run.mark_running()
    with tracked(run, record, resume=f"deltatune train --resume {run.path}"):
        _finish(algorithm, run, record, _loop(algorithm, run, callbacks, resume=True))
    return run


def _start(algorithm: Algorithm, run: RunDir, record: Recording, before: tuple[dict, list[Sample]],
           callbacks) -> RunDir:
    """A run from its first iteration: its inputs and the starting policy's figures written, then the loop."""
    cfg, rows = algorithm.cfg, algorithm.rows
    with tracked(run, record, resume=f"deltatune train --resume {run.path}"):
        write_inputs(run, cfg, algorithm.policy.tokenizer, rows.report, rows.rejects,
                     {s: len(rows.splits[s]) for s in ("train", "eval", "test")})
        metrics, samples = before
        run.write_json("baseline.json", metrics)
        run.write_jsonl("samples.jsonl", [{"prompt": prompt, "before": output, "reward_before": reward}
                                          for prompt, output, reward in samples])
        _finish(algorithm, run, record, _loop(algorithm, run, callbacks))
    return run


def _finish(algorithm: Algorithm, run: RunDir, record: Recording, state: LoopState) -> None:
    """The final policy on the held-out prompts, its delta, then the commit record: metrics.json."""
    after, samples = algorithm.evaluate()
    before = [json.loads(line) for line in (run.path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    run.write_jsonl("samples.jsonl", [{**row, "after": output, "reward_after": reward}
                                      for row, (_, output, reward) in zip(before, samples)])
    algorithm.save_delta(run.delta)
    baseline = run.read_json("baseline.json")
    trainable, total = count_parameters(algorithm.trainable())
    # tokens_per_s counts the tokens sampled
    write_metrics(run, algorithm.task, after, baseline, trainable, total, state,
                  reward_gain=after["reward"] - baseline["reward"], **algorithm.results(state))
    finish(run, record)


# ----------------------------------------------------------------------------- the loop and its checkpoints

def _loop(algorithm: Algorithm, run: RunDir, callbacks, resume: bool = False) -> LoopState:
    """``train.max_steps`` iterations (0: train.epochs passes over the prompts), logged to the run."""
    t = algorithm.cfg.train
    prompts = algorithm.items("train")
    per_epoch = math.ceil(len(prompts) / algorithm.per_step)
    total = t.max_steps or math.ceil(len(prompts) * t.epochs / algorithm.per_step)
    save_every = t.save_every or per_epoch
    optimizer = algorithm.optimizer()
    generator = torch.Generator().manual_seed(t.seed)
    state = _restore(algorithm, run, optimizer, generator) if resume else LoopState()
    stream = prompt_stream(prompts, t.seed, skip=state.step * algorithm.per_step)
    with Progress(total, enabled=t.progress) as bar:
        bar.update(state)
        while state.step < total:
            start = time.perf_counter()
            record, tokens = algorithm.iteration([next(stream) for _ in range(algorithm.per_step)], optimizer,
                                                 generator)
            seconds = time.perf_counter() - start
            state.step, state.seconds, state.loss = state.step + 1, state.seconds + seconds, record["loss"]
            state.tokens += tokens
            state.epoch = state.step * algorithm.per_step // len(prompts)
            state.best = record["reward"] if state.best is None else max(state.best, record["reward"])
            run.append_log({"step": state.step, **record, "seconds": round(seconds, 3)})
            bar.update(state)
            if state.step % save_every == 0 and state.step < total:
                _save(algorithm, run, optimizer, generator, state)
            for callback in callbacks:
                callback(state)
    return state


def _save(algorithm: Algorithm, run: RunDir, optimizer, generator: torch.Generator, state: LoopState) -> None:
    # No Method.loop_state: the one method that keeps any (AdaLoRA) refuses tasks with a loop of their own.
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    extra = {"algorithm": algorithm.state_dict(), "config": _settings(algorithm.cfg),
             "rng": {"python": [python_rng[0], list(python_rng[1]), python_rng[2]],
                     "numpy": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]}}
    save_checkpoint(run.checkpoint, algorithm.trainable(), optimizer, None, state, extra=extra,
                    extra_tensors={"rng.minibatches": generator.get_state()})


def _restore(algorithm: Algorithm, run: RunDir, optimizer, generator: torch.Generator) -> LoopState:
    """The checkpoint's state put back (``_save``); the log cut back to its step."""
    state = load_checkpoint(run.checkpoint, algorithm.trainable(), optimizer, None)
    extra, tensors = read_extra(run.checkpoint)
    try:
        algorithm.load_state_dict(extra["algorithm"])
        generator.set_state(tensors["rng.minibatches"])
        python_rng, numpy_rng = extra["rng"]["python"], extra["rng"]["numpy"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise RunError(f"{run.checkpoint}: the checkpoint lacks the {algorithm.name} loop's state ({exc}); it is "
                       f"damaged. Remove the folder {run.checkpoint} and resume again: the run then starts over "
                       "from its first step, which gives the same result") from exc
    random.setstate((python_rng[0], tuple(python_rng[1]), python_rng[2]))
    np.random.set_state((numpy_rng[0], np.array(numpy_rng[1], dtype=np.uint32), *numpy_rng[2:]))
    run.truncate_log(state.step)
    return state


def _settings(cfg: Config) -> dict[str, object]:
    """The config as flat ``key: value`` pairs (YAML's types), without what only changes how progress shows."""
    flat: dict[str, object] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value

    walk("", yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    flat.pop("train.progress", None)
    return flat


def _refuse_changed_config(run: RunDir, cfg: Config) -> None:
    """A run resumes with the settings its checkpoint was written with, or not at all."""
    saved = read_extra(run.checkpoint)[0].get("config")
    if saved is None:
        return
    now = _settings(cfg)
    changed = [f"{key} (was {saved.get(key)!r}, now {now.get(key)!r})" for key in sorted(set(saved) | set(now))
               if saved.get(key) != now.get(key)]
    if changed:
        raise RunError(f"{run.config}: the config changed since the run's last checkpoint: {'; '.join(changed)}. "
                       "A resumed run must train with the settings it started with, or its result would be "
                       "neither run's; put them back in config.yaml, or start a new run with the new settings")
