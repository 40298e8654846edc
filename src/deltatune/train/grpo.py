"""`task: grpo`: steer a causal LM toward a reward with GRPO (Shao et al. 2024, DeepSeekMath), no value model.

One iteration:
    1. ``grpo.prompts_per_step`` training prompts, ``grpo.group_size`` completions sampled for each;
    2. each completion's reward: the weighted sum of the ``grpo.rewards`` sources (rlhf/rewards.py);
       its advantage: the reward against its group's, (r - mean) / (std + 1e-4) (``group_advantages``);
    3. every completion token scored under the sampling policy and the reference (the delta switched off);
    4. ``grpo.epochs_per_batch`` passes of minibatches of ``grpo.minibatch`` completions over the clipped
       objective plus ``grpo.beta`` times the k3 KL estimate (``grpo_loss``).
``train.max_steps`` iterations (0: ``train.epochs`` passes over the training prompts). AdamW at a constant
``train.lr`` (with each rate a method asks for: LoRA+), ``train.weight_decay``, ``train.max_grad_norm``.

As in PPO (train/ppo.py): dropout is off, so the policy that sampled and the one updated agree and the
first minibatch's ratios are 1; log-probs are those of the temperature-scaled distribution; the run
directory is that of any run, ``delta/`` the peft adapter (``deltatune predict RUN`` generates with it);
before the run directory exists the starting policy is scored on the held-out prompts (a broken reward
fails there) and that is metrics.json's "before". GRPO runs keep no checkpoints: ``--resume`` refuses them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import set_seed

from ..assets import resolve_model
from ..config import Config
from ..data.prepare import PreparedRows
from ..errors import ConfigError, DeltatuneError
from ..fs import atomic_dir
from ..methods import registry
from ..models import count_parameters, load_tokenizer
from ..registry_db import Recording
from ..rlhf.losses import entropy_from_logits, group_advantages, grpo_loss, k3_kl, masked_mean
from ..rlhf.rewards import Source, load_sources
from ..rlhf.rollout import Policy, Rollout, encode_prompts, sample, token_logprobs
from ..rundir import RunDir, distributed, new_run_dir
from ..tasks import registry as tasks
from ..tasks.base import Task
from .checkpoint import LoopState
from .loop import adamw, param_groups
from .ppo import prompt_stream
from .progress import Progress
from .session import absolute_refs, finish, tracked, write_inputs, write_metrics


@dataclasses.dataclass
class Setup:
    """Everything a GRPO run needs, built and checked before anything is written."""
    cfg: Config
    task: Task
    policy: Policy  # no value head: GRPO has no value model
    sources: list[Source]
    rows: PreparedRows


@dataclasses.dataclass
class Groups:
    """One batch of sampled completions, ``group_size`` per prompt and next to each other."""
    rollout: Rollout
    rows: list[dict]                 # the prompt row of each completion
    parts: dict[str, torch.Tensor]   # each source's scores, by name

    def rewards(self, sources: list[Source]) -> torch.Tensor:
        return sum(s.weight * self.parts[s.name] for s in sources)


def train_grpo(cfg: Config, callbacks=(), kind: str = "train", parent: str | None = None) -> RunDir:
    """Train a policy with GRPO; returns the completed run directory. Bad input raises before one exists."""
    cfg = absolute_refs(_absolute_reward_refs(cfg))
    setup = build(cfg)
    before, before_samples = evaluate_policy(setup)  # may raise (a broken reward): nothing written yet
    run = new_run_dir(cfg.output_dir, cfg.run_name)
    record = Recording(run.path, cfg, kind, parent)
    rows = setup.rows
    with tracked(run, record, error="GRPO runs cannot be resumed; start a new run"):
        write_inputs(run, cfg, setup.policy.tokenizer, rows.report, rows.rejects,
                     {s: len(rows.splits[s]) for s in ("train", "eval", "test")})
        state = grpo_loop(setup, run, callbacks)
        after, after_samples = evaluate_policy(setup)
        run.write_jsonl("samples.jsonl", [{"prompt": b["prompt"], "before": b["responses"],
                                           "reward_before": b["rewards"], "after": a["responses"],
                                           "reward_after": a["rewards"]}
                                          for b, a in zip(before_samples, after_samples)])
        _finish(run, setup, before, after, state)
        finish(run, record)
    return run


# ----------------------------------------------------------------------------- setup

def build(cfg: Config) -> Setup:
    """Check the config, load the rewards, the prompts and the policy. Raises a DeltatuneError."""
    problems = cfg.grpo.problems(need_rewards=True)  # also when cfg did not come through configure.load_config
    if problems:
        raise ConfigError(problems)
    if distributed():
        raise DeltatuneError("task grpo runs in one process (completions are not sharded across processes); "
                             "start it with `deltatune train`, not a multi-process launch")
    torch.set_flush_denormal(True)
    sources = load_sources(cfg)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    task = tasks.get(cfg.task)(cfg, pad_id=tokenizer.pad_token_id)
    rows = task.rows()  # the prompts through the usual pipeline (templates, cleaning, dedup, split, limits)
    for source in sources:
        source.check_rows(rows.splits["train"] + rows.splits["eval"])
    method = registry.get(cfg.method.name)
    set_seed(cfg.train.seed)
    model = task.build_model(model_path, **method.load_kwargs(cfg.method.options))
    model = method.apply(model, cfg.method.options, task).to(PartialState().device)
    model.eval()  # no dropout: see the module docstring
    policy = Policy(model, None, tokenizer)
    check_reference(policy, [row[cfg.data.prompt_column] for row in rows.splits["eval"][:2]], cfg)
    return Setup(cfg, task, policy, sources, rows)


@torch.no_grad()
def check_reference(policy: Policy, prompts: list[str], cfg: Config) -> None:
    """The reference (the delta switched off) must be the starting policy, so that the KL penalty measures how
    far training moved it. A delta that starts away from zero and moved the base to compensate breaks that."""
    ids, mask = (x.to(policy.device) for x in encode_prompts(policy.tokenizer, prompts, cfg.data.chat_template,
                                                             cfg.train.max_length))
    start, _ = policy.forward(ids, mask, 1, 1.0, values=False)
    with policy.reference():
        reference, _ = policy.forward(ids, mask, 1, 1.0, values=False)
    if not torch.allclose(start, reference, atol=1e-4, rtol=1e-4):
        gap = (start - reference).abs().max().item()
        raise ConfigError([f"method: with its delta switched off, the model is not the starting policy (logits "
                           f"differ by up to {gap:.3g}), so it cannot be GRPO's reference: this method's options "
                           "move part of the base into the delta at the start (e.g. method.init=pissa or olora); "
                           "use options that start the delta at zero (method.init=default or gaussian)"])


def _absolute_reward_refs(cfg: Config) -> Config:
    """Reward runs and reward files as absolute paths, so the saved config works from any directory."""
    entries = []
    for entry in cfg.grpo.rewards:
        entry = dict(entry)
        if entry.get("run"):
            entry["run"] = str(Path(entry["run"]).expanduser().resolve())
        where, _, name = (entry.get("function") or "").rpartition(":")
        if where.endswith(".py"):
            entry["function"] = f"{Path(where).expanduser().resolve()}:{name}"
        entries.append(entry)
    return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, rewards=entries))


# ----------------------------------------------------------------------------- the loop

def grpo_loop(setup: Setup, run: RunDir, callbacks=()) -> LoopState:
    """``train.max_steps`` GRPO iterations (0: train.epochs passes over the prompts), logged to the run."""
    cfg, policy, g, t = setup.cfg, setup.policy, setup.cfg.grpo, setup.cfg.train
    prompts = setup.rows.splits["train"]
    total = t.max_steps or math.ceil(len(prompts) * t.epochs / g.prompts_per_step)
    method = registry.get(cfg.method.name)
    optimizer = adamw(param_groups(policy.model, method, cfg.method.options, t.lr, t.weight_decay), lr=t.lr,
                      weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(t.seed)
    stream = prompt_stream(prompts, t.seed)
    state = LoopState()
    with Progress(total, enabled=t.progress) as bar:
        while state.step < total:
            start = time.perf_counter()
            groups = collect(setup, [next(stream) for _ in range(g.prompts_per_step)])
            rewards = groups.rewards(setup.sources)
            stats = grpo_update(policy, optimizer, groups.rollout, group_advantages(rewards, g.group_size), g,
                                t.max_grad_norm, generator)
            seconds = time.perf_counter() - start
            rollout = groups.rollout
            spread = rewards.view(-1, g.group_size).std(-1)
            state.step, state.seconds, state.loss = state.step + 1, state.seconds + seconds, stats["loss"]
            state.tokens += int(rollout.mask.sum())
            state.epoch = state.step * g.prompts_per_step // len(prompts)
            state.best = max(rewards.mean().item(), state.best if state.best is not None else -math.inf)
            run.append_log({"step": state.step, "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                            **{f"reward/{name}": part.mean().item() for name, part in groups.parts.items()},
                            "frac_reward_zero_std": (spread < 1e-6).float().mean().item(),
                            "kl": masked_mean(k3_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask),
                                              rollout.mask).item(),
                            **stats, "response_length": rollout.mask.sum(-1).float().mean().item(),
                            "seconds": round(seconds, 3)})
            bar.update(state)
            for callback in callbacks:
                callback(state)
    return state


def collect(setup: Setup, rows: list[dict]) -> Groups:
    """``group_size`` completions of each row's prompt, their token log-probs (policy, reference) and rewards."""
    cfg, g = setup.cfg, setup.cfg.grpo
    rows = [row for row in rows for _ in range(g.group_size)]
    rollout = sample(setup.policy, [row[cfg.data.prompt_column] for row in rows], g, cfg.data.chat_template,
                     cfg.train.max_length)
    score_tokens(setup.policy, rollout, g.temperature, g.minibatch or len(rollout))
    parts = {s.name: s(rollout.prompts, rollout.responses, rows).to(rollout.logprobs.device) for s in setup.sources}
    return Groups(rollout, rows, parts)


@torch.no_grad()
def score_tokens(policy: Policy, rollout: Rollout, temperature: float, chunk: int) -> None:
    """Fill in the sampling policy's and the reference's log-probs, ``chunk`` completions at a time."""
    logprobs, ref_logprobs = [], []
    for begin in range(0, len(rollout), chunk):
        part = rollout.select(torch.arange(begin, min(begin + chunk, len(rollout))))
        ids, attention = part.inputs()
        n = part.response.shape[1]
        logits, _ = policy.forward(ids, attention, n, temperature, values=False)
        logprobs.append(token_logprobs(logits, part.response))
        with policy.reference():
            ref_logits, _ = policy.forward(ids, attention, n, temperature, values=False)
        ref_logprobs.append(token_logprobs(ref_logits, part.response))
    rollout.logprobs, rollout.ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)


def grpo_update(policy: Policy, optimizer, rollout: Rollout, advantages: torch.Tensor, g, max_grad_norm: float,
                generator: torch.Generator) -> dict[str, float]:
    """``g.epochs_per_batch`` passes of minibatch steps on one batch of completions; the mean of each statistic."""
    params = [x for group in optimizer.param_groups for x in group["params"]]
    stats = defaultdict(list)
    for _ in range(g.epochs_per_batch):
        for index in torch.randperm(len(rollout), generator=generator).split(g.minibatch or len(rollout)):
            batch = rollout.select(index)
            ids, attention = batch.inputs()
            logits, _ = policy.forward(ids, attention, batch.response.shape[1], g.temperature, values=False)
            loss, kl, clip_fraction = grpo_loss(token_logprobs(logits, batch.response), batch.logprobs,
                                                batch.ref_logprobs, advantages[index.to(advantages.device)],
                                                batch.mask, g.clip, g.beta, g.aggregate)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            entropy = entropy_from_logits(logits.detach(), batch.mask)
            for key, value in {"loss": loss, "clip_fraction": clip_fraction, "entropy": entropy}.items():
                stats[key].append(value.item())
    return {key: sum(values) / len(values) for key, values in stats.items()}


# ----------------------------------------------------------------------------- evaluation and results

def evaluate_policy(setup: Setup) -> tuple[dict, list[dict]]:
    """Mean reward (and each source's), KL to the reference (k3, per token) and completion length on the
    held-out prompts, ``group_size`` completions of each sampled with the rollout settings from a fixed
    seed (the same draws before and after training); and each prompt's completions with their rewards."""
    cfg = setup.cfg
    rows, size = setup.rows.splits["eval"], max(1, cfg.train.eval_batch_size // cfg.grpo.group_size)
    batches = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        for begin in range(0, len(rows), size):
            batches.append(collect(setup, rows[begin:begin + size]))
    rewards = torch.cat([b.rewards(setup.sources) for b in batches])
    kl = sum(k3_kl(b.rollout.logprobs, b.rollout.ref_logprobs, b.rollout.mask).sum().item() for b in batches)
    lengths = torch.cat([b.rollout.mask.sum(-1).float() for b in batches])
    metrics = {"reward": rewards.mean().item(),
               **{f"reward/{s.name}": torch.cat([b.parts[s.name] for b in batches]).mean().item()
                  for s in setup.sources},
               "kl": kl / lengths.sum().item(), "response_length": lengths.mean().item(), "prompts": len(rows),
               "completions": len(rewards)}
    k = cfg.grpo.group_size
    responses = [r for b in batches for r in b.rollout.responses]
    samples = [{"prompt": row[cfg.data.prompt_column], "responses": responses[i * k:(i + 1) * k],
                "rewards": [round(float(x), 4) for x in rewards[i * k:(i + 1) * k]]} for i, row in enumerate(rows)]
    return metrics, samples


def _finish(run: RunDir, setup: Setup, before: dict, after: dict, state: LoopState) -> None:
    cfg, policy, g = setup.cfg, setup.policy, setup.cfg.grpo
    method = registry.get(cfg.method.name)
    atomic_dir(run.delta, lambda tmp: method.save_delta(policy.model, tmp, cfg.method.options))
    trainable, total = count_parameters(policy.model)
    # tokens_per_s counts the completion tokens sampled
    write_metrics(run, setup.task, after, before, trainable, total, state,
                  reward_gain=after["reward"] - before["reward"],
                  eval_sampling={"temperature": g.temperature, "top_k": g.top_k, "max_new_tokens": g.max_new_tokens,
                                 "group_size": g.group_size, "seed": cfg.train.seed},
                  completions=state.step * g.prompts_per_step * g.group_size)
