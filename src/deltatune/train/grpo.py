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
directory is that of any run, ``delta/`` the peft adapter (``deltatune predict RUN`` generates with it).
The run (set-up, the loop over iterations, checkpoints, ``--resume``, the finish) is train/online.py's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config
from ..data.prepare import PreparedRows
from ..errors import ConfigError
from ..fs import atomic_dir
from ..methods import registry
from ..rlhf.losses import entropy_from_logits, group_advantages, grpo_loss, k3_kl, masked_mean
from ..rlhf.rewards import Source, load_sources
from ..rlhf.rollout import Policy, Rollout, encode_prompts, sample, score_tokens, token_logprobs
from ..rundir import RunDir
from . import online
from .checkpoint import LoopState
from .loop import adamw, param_groups


@dataclasses.dataclass
class Groups:
    """One batch of sampled completions, ``group_size`` per prompt and next to each other."""
    rollout: Rollout
    rows: list[dict]                 # the prompt row of each completion
    parts: dict[str, torch.Tensor]   # each source's scores, by name

    def rewards(self, sources: list[Source]) -> torch.Tensor:
        return sum(s.weight * self.parts[s.name] for s in sources)


class GRPO(online.Algorithm):
    """A GRPO run's policy (no value head: GRPO has no value model), reward sources and prompt rows, built and
    checked before anything is written."""
    name = "GRPO"

    def __init__(self, cfg: Config, task, policy: Policy, rows: PreparedRows, sources: list[Source]):
        super().__init__(cfg, task, policy, rows)
        self.sources = sources

    @classmethod
    def build(cls, cfg: Config) -> "GRPO":
        """Check the config, load the rewards, the prompts and the policy. Raises a DeltatuneError."""
        sources, tokenizer, task, rows = online.load_inputs(cfg, cfg.grpo.problems(need_rewards=True), load_sources)
        for source in sources:
            source.check_rows(rows.splits["train"] + rows.splits["eval"])
        policy = Policy(online.load_policy_model(cfg, task), None, tokenizer)
        check_reference(policy, [row[cfg.data.prompt_column] for row in rows.splits["eval"][:2]], cfg)
        return cls(cfg, task, policy, rows, sources)

    @staticmethod
    def absolute_refs(cfg: Config) -> Config:
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

    @property
    def per_step(self) -> int:
        return self.cfg.grpo.prompts_per_step

    def items(self, split: str) -> list[dict]:
        return self.rows.splits[split]

    def optimizer(self) -> torch.optim.Optimizer:
        cfg, t = self.cfg, self.cfg.train
        groups = param_groups(self.policy.model, registry.get(cfg.method.name), cfg.method.options, t.lr,
                              t.weight_decay)
        return adamw(groups, lr=t.lr, weight_decay=t.weight_decay)

    def iteration(self, rows: list[dict], optimizer, generator: torch.Generator) -> tuple[dict, int]:
        g = self.cfg.grpo
        groups = self.collect(rows)
        rewards, rollout = groups.rewards(self.sources), groups.rollout
        stats = self.update(optimizer, rollout, group_advantages(rewards, g.group_size), generator)
        spread = rewards.view(-1, g.group_size).std(-1)
        return ({"reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                 **{f"reward/{name}": part.mean().item() for name, part in groups.parts.items()},
                 "frac_reward_zero_std": (spread < 1e-6).float().mean().item(),
                 "kl": masked_mean(k3_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask), rollout.mask).item(),
                 **stats, "response_length": rollout.mask.sum(-1).float().mean().item()}, int(rollout.mask.sum()))

    def collect(self, rows: list[dict]) -> Groups:
        """``group_size`` completions of each row's prompt, their token log-probs (policy, reference) and rewards."""
        cfg, g = self.cfg, self.cfg.grpo
        rows = [row for row in rows for _ in range(g.group_size)]
        rollout = sample(self.policy, [row[cfg.data.prompt_column] for row in rows], g, cfg.data.chat_template,
                         cfg.train.max_length)
        score_tokens(self.policy, rollout, g.temperature, g.minibatch or len(rollout))
        parts = {s.name: s(rollout.prompts, rollout.responses, rows).to(rollout.logprobs.device)
                 for s in self.sources}
        return Groups(rollout, rows, parts)

    def update(self, optimizer, rollout: Rollout, advantages: torch.Tensor,
               generator: torch.Generator) -> dict[str, float]:
        """``grpo.epochs_per_batch`` passes of minibatch steps on one batch of completions; the mean of each
        statistic."""
        g = self.cfg.grpo

        def losses(index: torch.Tensor) -> dict[str, torch.Tensor]:
            batch = rollout.select(index)
            ids, attention = batch.inputs()
            logits, _ = self.policy.forward(ids, attention, batch.response.shape[1], g.temperature, values=False)
            loss, _, clip_fraction = grpo_loss(token_logprobs(logits, batch.response), batch.logprobs,
                                                batch.ref_logprobs, advantages[index.to(advantages.device)],
                                                batch.mask, g.clip, g.beta, g.aggregate)
            return {"loss": loss, "clip_fraction": clip_fraction,
                    "entropy": entropy_from_logits(logits.detach(), batch.mask)}

        return online.minibatch_steps(optimizer, len(rollout), g.minibatch or len(rollout), g.epochs_per_batch,
                                      self.cfg.train.max_grad_norm, generator, losses)

    def evaluate(self) -> tuple[dict, list[online.Sample]]:
        """Mean reward (and each source's), KL to the reference (k3, per token) and completion length on the
        held-out prompts, ``group_size`` completions of each sampled with the rollout settings from a fixed
        seed (the same draws before and after training); and each prompt's completions with their rewards."""
        cfg, k = self.cfg, self.cfg.grpo.group_size
        rows, size = self.rows.splits["eval"], max(1, cfg.train.eval_batch_size // k)
        batches = online.fixed_draws(cfg.train.seed, self.collect,
                                     [rows[b:b + size] for b in range(0, len(rows), size)])
        rewards = torch.cat([b.rewards(self.sources) for b in batches])
        kl = sum(k3_kl(b.rollout.logprobs, b.rollout.ref_logprobs, b.rollout.mask).sum().item() for b in batches)
        lengths = torch.cat([b.rollout.mask.sum(-1).float() for b in batches])
        metrics = {"reward": rewards.mean().item(),
                   **{f"reward/{s.name}": torch.cat([b.parts[s.name] for b in batches]).mean().item()
                      for s in self.sources},
                   "kl": kl / lengths.sum().item(), "response_length": lengths.mean().item(), "prompts": len(rows),
                   "completions": len(rewards)}
        responses = [r for b in batches for r in b.rollout.responses]
        samples = [(row[cfg.data.prompt_column], responses[i * k:(i + 1) * k],
                    [round(float(x), 4) for x in rewards[i * k:(i + 1) * k]]) for i, row in enumerate(rows)]
        return metrics, samples

    def save_delta(self, path: Path) -> None:
        method, options = registry.get(self.cfg.method.name), self.cfg.method.options
        atomic_dir(path, lambda tmp: method.save_delta(self.policy.model, tmp, options))

    def results(self, state: LoopState) -> dict:
        g = self.cfg.grpo
        return {"eval_sampling": {"temperature": g.temperature, "top_k": g.top_k, "max_new_tokens": g.max_new_tokens,
                                  "group_size": g.group_size, "seed": self.cfg.train.seed},
                "completions": state.step * g.prompts_per_step * g.group_size}


def train_grpo(cfg: Config, callbacks=(), kind: str = "train", parent: str | None = None) -> RunDir:
    """Train a policy with GRPO; returns the completed run directory. Bad input raises before one exists."""
    return online.train(GRPO, cfg, callbacks, kind, parent)


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
