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

The run (set-up, the loop over iterations, checkpoints, ``--resume``, the finish) is train/online.py's,
shared with GRPO; a checkpoint also keeps the value head and the adaptive KL coefficient. The run
directory is that of any training run; ``delta/`` is the peft adapter (so ``deltatune predict RUN``
generates with it) plus ``value_head.safetensors``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import Config
from ..data.prepare import PreparedRows
from ..fs import atomic_dir
from ..methods import registry
from ..rlhf.losses import (AdaptiveKLController, entropy_from_logits, gae, kl_penalty_rewards, ppo_policy_loss,
                           value_loss, whiten)
from ..rlhf.rewards import RewardFn, load_reward
from ..rlhf.rollout import Policy, Rollout, sample, score_tokens, token_logprobs
from ..rundir import RunDir
from ..tasks import registry as tasks
from . import online
from .checkpoint import LoopState
from .loop import adamw

VALUE_HEAD_FILE = "value_head.safetensors"


class PPO(online.Algorithm):
    """A PPO run's policy (with its value head), reward and prompts, built and checked before anything is written."""
    name = "PPO"

    def __init__(self, cfg: Config, task, policy: Policy, rows: PreparedRows, reward: RewardFn):
        super().__init__(cfg, task, policy, rows)
        p = cfg.ppo
        self.reward = reward
        self.controller = AdaptiveKLController(p.kl_coef, p.target_kl, p.kl_horizon) if p.target_kl else None
        self.with_head = nn.ModuleDict({"model": policy.model, "value_head": policy.value_head})

    @classmethod
    def build(cls, cfg: Config) -> "PPO":
        """Check the config, load the reward, the prompts and the policy. Raises a DeltatuneError."""
        reward, tokenizer, task, rows = online.load_inputs(cfg, cfg.ppo.problems(need_source=True), load_reward)
        return cls(cfg, task, Policy.wrap(online.load_policy_model(cfg, task), tokenizer), rows, reward)

    @staticmethod
    def absolute_refs(cfg: Config) -> Config:
        p = cfg.ppo
        model = str(Path(p.reward_model).expanduser().resolve()) if p.reward_model else None
        fn = p.reward_fn
        if fn and fn.rpartition(":")[0].endswith(".py"):
            where, _, name = fn.rpartition(":")
            fn = f"{Path(where).expanduser().resolve()}:{name}"
        return dataclasses.replace(cfg, ppo=dataclasses.replace(p, reward_model=model, reward_fn=fn))

    @property
    def per_step(self) -> int:
        return self.cfg.ppo.rollout_batch

    def items(self, split: str) -> list[str]:
        return self.prompts(split)

    def prompts(self, split: str) -> list[str]:
        return [row[self.cfg.data.prompt_column] for row in self.rows.splits[split]]

    def trainable(self) -> nn.Module:
        return self.with_head

    def optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        return adamw([x for x in self.with_head.parameters() if x.requires_grad], lr=t.lr, weight_decay=t.weight_decay)

    def iteration(self, prompts: list[str], optimizer, generator: torch.Generator) -> tuple[dict, int]:
        p = self.cfg.ppo
        kl_coef = self.controller.value if self.controller else p.kl_coef
        rollout = self.collect(prompts)
        stats = self.update(optimizer, rollout, kl_coef, generator)
        kl = rollout.kl().mean().item()
        if self.controller:
            self.controller.update(kl, len(rollout))
        return ({"reward": rollout.scores.mean().item(), "kl": kl, "kl_coef": kl_coef, **stats,
                 "response_length": rollout.mask.sum(-1).float().mean().item()}, int(rollout.mask.sum()))

    def collect(self, prompts: list[str]) -> Rollout:
        """Sampled responses with token log-probs (policy, reference), values and rewards."""
        cfg = self.cfg
        rollout = sample(self.policy, prompts, cfg.ppo, cfg.data.chat_template, cfg.train.max_length)
        score_tokens(self.policy, rollout, cfg.ppo.temperature, cfg.ppo.minibatch)
        rollout.scores = self.reward(rollout.prompts, rollout.responses).to(rollout.values.device)
        return rollout

    def update(self, optimizer, rollout: Rollout, kl_coef: float, generator: torch.Generator) -> dict[str, float]:
        """``ppo.ppo_epochs`` passes of minibatch steps on one batch of rollouts; the mean of each statistic."""
        p = self.cfg.ppo
        rewards = kl_penalty_rewards(rollout.logprobs, rollout.ref_logprobs, rollout.scores, rollout.mask, kl_coef)
        advantages, returns = gae(rewards, rollout.values, rollout.mask, p.gamma, p.lam)
        advantages = whiten(advantages, rollout.mask)
        return online.minibatch_steps(
            optimizer, len(rollout), p.minibatch, p.ppo_epochs, self.cfg.train.max_grad_norm, generator,
            lambda index: ppo_losses(self.policy, rollout.select(index), advantages[index], returns[index], p))

    def evaluate(self) -> tuple[dict, list[online.Sample]]:
        """Mean reward and KL to the reference on the held-out prompts, sampled with the rollout settings
        from a fixed seed (the same draws before and after training); and each prompt's response."""
        t = self.cfg.train
        prompts = self.prompts("eval")
        rollouts = online.fixed_draws(t.seed, self.collect, [prompts[start:start + t.eval_batch_size]
                                                             for start in range(0, len(prompts), t.eval_batch_size)])
        scores = torch.cat([r.scores for r in rollouts])
        kl = torch.cat([r.kl() for r in rollouts])
        lengths = torch.cat([r.mask.sum(-1).float() for r in rollouts])
        samples = [(q, a, round(float(s), 4)) for q, a, s in zip(prompts, [x for r in rollouts for x in r.responses],
                                                                  scores)]
        return {"reward": scores.mean().item(), "kl": kl.mean().item(), "response_length": lengths.mean().item(),
                "prompts": len(prompts)}, samples

    def save_delta(self, path: Path) -> None:
        save_policy(self.policy, registry.get(self.cfg.method.name), self.cfg.method.options, path)

    def results(self, state: LoopState) -> dict:
        p = self.cfg.ppo
        return {"eval_sampling": {"temperature": p.temperature, "top_k": p.top_k, "max_new_tokens": p.max_new_tokens,
                                  "seed": self.cfg.train.seed},
                "rollouts": state.step * p.rollout_batch}

    def state_dict(self) -> dict:
        return {"kl_coef": self.controller.value} if self.controller else {}

    def load_state_dict(self, state: dict) -> None:
        if self.controller:
            self.controller.value = state["kl_coef"]


def train_ppo(cfg: Config, callbacks=(), kind: str = "train", parent: str | None = None) -> RunDir:
    """Train a policy with PPO; returns the completed run directory. Bad input raises before one exists."""
    return online.train(PPO, cfg, callbacks, kind, parent)


def build(cfg: Config) -> PPO:
    return PPO.build(cfg)


def prompt_rows(cfg: Config) -> PreparedRows:
    """The prompt column through the usual pipeline (templates, cleaning, dedup, split, limits)."""
    return tasks.get(cfg.task)(cfg).rows()


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


def save_policy(policy: Policy, method, options, path: Path) -> None:
    """The peft adapter folder plus the value head (PEFT ignores the extra file)."""
    def build(tmp: Path) -> None:
        method.save_delta(policy.model, tmp, options)
        save_file({k: v.detach().contiguous().cpu() for k, v in policy.value_head.state_dict().items()},
                  tmp / VALUE_HEAD_FILE)
    atomic_dir(path, build)
