"""`task: ppo`: steer a causal LM toward a reward with PPO (Ziegler et al. 2019; Stiennon et al. 2020).

One iteration:
    1. sample a response to each of ``ppo.rollout_batch`` prompts from the policy;
    2. score every response token under the policy, the reference (the delta switched off) and
       the value head, and each response with the reward;
    3. per-token rewards  r_t = -kl_coef (log pi - log ref)_t  + [t last] * score;
       GAE advantages, whitened over the batch;
    4. ``ppo.ppo_epochs`` passes of minibatches of ``ppo.minibatch`` rollouts over
       clipped surrogate + vf_coef * clipped value loss - entropy_coef * entropy;
    5. the adaptive KL controller moves kl_coef toward ``ppo.target_kl``.
``train.max_steps`` iterations (0: ``train.epochs`` passes over the training prompts).

Dropout is off throughout (as TRL does), so the policy that sampled and the one being
updated agree exactly on the first minibatch: ratios start at 1. Log-probs are those of the
temperature-scaled distribution (``ppo.temperature``); top-k is a sampling filter only.

The run directory is that of any training run; ``delta/`` is the peft adapter (so
``deltatune predict RUN`` generates with it) plus ``value_head.safetensors``. Before the run
directory exists, the starting policy is scored on the held-out prompts: that proves the
reward works end to end and is the "before" figure of metrics.json.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from accelerate import PartialState
from safetensors.torch import save_file
from transformers import set_seed

from ..assets import resolve_model
from ..config import Config
from ..data.prepare import PreparedRows
from ..errors import ConfigError, DeltatuneError
from ..fs import atomic_dir
from ..methods import registry
from ..models import count_parameters, load_tokenizer
from ..registry_db import Recording
from ..rlhf.losses import (AdaptiveKLController, entropy_from_logits, gae, kl_penalty_rewards, ppo_policy_loss,
                           value_loss, whiten)
from ..rlhf.rewards import RewardFn, load_reward
from ..rlhf.rollout import Policy, Rollout, sample, score_tokens, token_logprobs
from ..rundir import RunDir, distributed, new_run_dir
from ..tasks import registry as tasks
from ..tasks.base import Task
from .checkpoint import LoopState
from .loop import adamw
from .progress import Progress
from .session import absolute_refs, finish, tracked, write_inputs, write_metrics

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclasses.dataclass
class Setup:
    """Everything a PPO run needs, built and checked before anything is written."""
    cfg: Config
    task: Task
    policy: Policy
    reward: RewardFn
    rows: PreparedRows

    def prompts(self, split: str) -> list[str]:
        return [row[self.cfg.data.prompt_column] for row in self.rows.splits[split]]


def train_ppo(cfg: Config, callbacks=(), kind: str = "train", parent: str | None = None) -> RunDir:
    """Train a policy with PPO; returns the completed run directory. Bad input raises before one exists."""
    cfg = absolute_refs(_absolute_reward_refs(cfg))
    setup = build(cfg)
    before, before_samples = evaluate_policy(setup)  # may raise (a broken reward): nothing written yet
    run = new_run_dir(cfg.output_dir, cfg.run_name)
    record = Recording(run.path, cfg, kind, parent)
    rows = setup.rows
    with tracked(run, record, error="PPO runs cannot be resumed; start a new run"):
        write_inputs(run, cfg, setup.policy.tokenizer, rows.report, rows.rejects,
                     {s: len(rows.splits[s]) for s in ("train", "eval", "test")})
        state = ppo_loop(setup, run, callbacks)
        after, after_samples = evaluate_policy(setup)
        run.write_jsonl("samples.jsonl", [{"prompt": b["prompt"], "before": b["response"],
                                           "reward_before": b["reward"], "after": a["response"],
                                           "reward_after": a["reward"]}
                                          for b, a in zip(before_samples, after_samples)])
        _finish(run, setup, before, after, state)
        finish(run, record)
    return run


# ----------------------------------------------------------------------------- setup

def build(cfg: Config) -> Setup:
    """Check the config, load the reward, the prompts and the policy. Raises a DeltatuneError."""
    problems = cfg.ppo.problems(need_source=True)  # also when cfg did not come through configure.load_config
    if problems:
        raise ConfigError(problems)
    if distributed():
        raise DeltatuneError("task ppo runs in one process (rollouts are not sharded across processes); "
                             "start it with `deltatune train`, not a multi-process launch")
    torch.set_flush_denormal(True)
    reward = load_reward(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id)
    rows = task.rows()  # the prompts through the usual pipeline (templates, cleaning, dedup, split, limits)
    method = registry.get(cfg.method.name)
    set_seed(cfg.train.seed)
    model = task.build_model(model_path, **method.load_kwargs(cfg.method.options))
    model = method.apply(model, cfg.method.options, task).to(PartialState().device)
    model.eval()  # no dropout: see the module docstring
    return Setup(cfg, task, Policy.wrap(model, tokenizer), reward, rows)


def prompt_rows(cfg: Config) -> PreparedRows:
    """The prompt column through the usual pipeline (templates, cleaning, dedup, split, limits)."""
    return tasks.get(cfg.task)(cfg).rows()


def _absolute_reward_refs(cfg: Config) -> Config:
    p = cfg.ppo
    model = str(Path(p.reward_model).expanduser().resolve()) if p.reward_model else None
    fn = p.reward_fn
    if fn and fn.rpartition(":")[0].endswith(".py"):
        where, _, name = fn.rpartition(":")
        fn = f"{Path(where).expanduser().resolve()}:{name}"
    return dataclasses.replace(cfg, ppo=dataclasses.replace(p, reward_model=model, reward_fn=fn))


# ----------------------------------------------------------------------------- the loop

def ppo_loop(setup: Setup, run: RunDir, callbacks=()) -> LoopState:
    """``train.max_steps`` PPO iterations (0: train.epochs passes over the prompts), logged to the run."""
    cfg, policy = setup.cfg, setup.policy
    p, t = cfg.ppo, cfg.train
    prompts = setup.prompts("train")
    total = t.max_steps or math.ceil(len(prompts) * t.epochs / p.rollout_batch)
    params = [x for x in policy.model.parameters() if x.requires_grad] + list(policy.value_head.parameters())
    optimizer = adamw(params, lr=t.lr, weight_decay=t.weight_decay)
    controller = AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.target_kl else None
    generator = torch.Generator().manual_seed(t.seed)
    stream = prompt_stream(prompts, t.seed)
    state = LoopState()
    with Progress(total, enabled=t.progress) as bar:
        while state.step < total:
            start = time.perf_counter()
            kl_coef = controller.value if controller else p.kl_coef
            rollout = collect(setup, [next(stream) for _ in range(p.rollout_batch)])
            stats = ppo_update(policy, optimizer, rollout, kl_coef, p, t.max_grad_norm, generator)
            kl = rollout.kl().mean().item()
            if controller:
                controller.update(kl, len(rollout))
            seconds = time.perf_counter() - start
            score = rollout.scores.mean().item()
            state.step, state.seconds, state.loss = state.step + 1, state.seconds + seconds, stats["loss"]
            state.tokens += int(rollout.mask.sum())
            state.epoch = state.step * p.rollout_batch // len(prompts)
            state.best = score if state.best is None else max(state.best, score)
            run.append_log({"step": state.step, "reward": score, "kl": kl, "kl_coef": kl_coef, **stats,
                            "response_length": rollout.mask.sum(-1).float().mean().item(),
                            "seconds": round(seconds, 3)})
            bar.update(state)
            for callback in callbacks:
                callback(state)
    return state


def prompt_stream(prompts: list[str], seed: int) -> Iterator[str]:
    """The prompts in a fresh order every epoch; the order depends only on (seed, epoch)."""
    epoch = 0
    while True:
        order = list(prompts)
        random.Random(seed + epoch).shuffle(order)
        yield from order
        epoch += 1


def collect(setup: Setup, prompts: list[str]) -> Rollout:
    """Sampled responses with token log-probs (policy, reference), values and rewards."""
    cfg = setup.cfg
    rollout = sample(setup.policy, prompts, cfg.ppo, cfg.data.chat_template, cfg.train.max_length)
    score_tokens(setup.policy, rollout, cfg.ppo.temperature, cfg.ppo.minibatch)
    rollout.scores = setup.reward(rollout.prompts, rollout.responses).to(rollout.values.device)
    return rollout


def ppo_update(policy: Policy, optimizer, rollout: Rollout, kl_coef: float, p, max_grad_norm: float,
               generator: torch.Generator) -> dict[str, float]:
    """``p.ppo_epochs`` passes of minibatch steps on one batch of rollouts; the mean of each statistic."""
    rewards = kl_penalty_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores, rollout.mask, kl_coef)
    advantages, returns = gae(rewards, rollout.values, rollout.mask, p.gamma, p.lam)
    advantages = whiten(advantages, rollout.mask)
    params = [x for group in optimizer.param_groups for x in group["params"]]
    stats = defaultdict(list)
    for _ in range(p.ppo_epochs):
        for index in torch.randperm(len(rollout), generator=generator).split(p.minibatch):
            losses = ppo_losses(policy, rollout.select(index), advantages[index], returns[index], p)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            for key, value in losses.items():
                stats[key].append(value.item())
    return {key: sum(values) / len(values) for key, values in stats.items()}


def ppo_losses(policy: Policy, batch: Rollout, advantages, returns, p) -> dict[str, torch.Tensor]:
    ids, attention = batch.inputs()
    logits, values = policy.forward(ids, attention, batch.response.shape[1], p.temperature)
    logprobs = token_logprobs(logits, batch.response)
    policy_loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, batch.logprobs, advantages, batch.mask,
                                                            p.clip_range)
    v_loss = value_loss(values, batch.values, returns, batch.mask, p.value_clip)
    with torch.set_grad_enabled(p.entropy_coef > 0):  # otherwise only logged: no graph
        entropy = entropy_from_logits(logits, batch.mask)
    loss = policy_loss + p.vf_coef * v_loss - p.entropy_coef * entropy
    return {"loss": loss, "policy_loss": policy_loss.detach(), "value_loss": v_loss.detach(),
            "entropy": entropy.detach(), "clip_fraction": clip_fraction, "approx_kl": approx_kl}


# ----------------------------------------------------------------------------- evaluation and results

def evaluate_policy(setup: Setup) -> tuple[dict, list[dict]]:
    """Mean reward and KL to the reference on the held-out prompts, sampled with the rollout settings
    from a fixed seed (the same draws before and after training); and each prompt's response."""
    cfg = setup.cfg
    prompts = setup.prompts("eval")
    rollouts = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        for start in range(0, len(prompts), cfg.train.eval_batch_size):
            rollouts.append(collect(setup, prompts[start:start + cfg.train.eval_batch_size]))
    scores = torch.cat([r.scores for r in rollouts])
    kl = torch.cat([r.kl() for r in rollouts])
    lengths = torch.cat([r.mask.sum(-1).float() for r in rollouts])
    samples = [{"prompt": q, "response": a, "reward": round(float(s), 4)}
               for q, a, s in zip(prompts, [x for r in rollouts for x in r.responses], scores)]
    return {"reward": scores.mean().item(), "kl": kl.mean().item(), "response_length": lengths.mean().item(),
            "prompts": len(prompts)}, samples


def save_policy(policy: Policy, method, options, path: Path) -> None:
    """The peft adapter folder plus the value head (PEFT ignores the extra file)."""
    def build(tmp: Path) -> None:
        method.save_delta(policy.model, tmp, options)
        save_file({k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()},
                  tmp / VALUE_HEAD_FILE)
    atomic_dir(path, build)


def _finish(run: RunDir, setup: Setup, before: dict, after: dict, state: LoopState) -> None:
    cfg, policy, p = setup.cfg, setup.policy, setup.cfg.ppo
    save_policy(policy, registry.get(cfg.method.name), cfg.method.options, run.delta)
    trainable, total = count_parameters(policy.model)
    head = sum(x.numel() for x in policy.value_head.parameters())
    # tokens_per_s counts the response tokens sampled
    write_metrics(run, setup.task, after, before, trainable + head, total + head, state,
                  reward_gain=after["reward"] - before["reward"],
                  eval_sampling={"temperature": p.temperature, "top_k": p.top_k, "max_new_tokens": p.max_new_tokens,
                                 "seed": cfg.train.seed},
                  rollouts=state.step * p.rollout_batch)
