"""GRPO's loss and advantages: values worked out by hand, and TRL 1.16's own code as the reference:
``GRPOTrainer._compute_loss`` called with a minimal stand-in for the trainer on random log-probabilities
(loss, gradients and logged statistics to 1e-6), and its group normalisation of the rewards (the formula
of ``_generate_and_score_completions``, which needs a whole trainer, with TRL's own ``nanstd``)."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

from deltatune.rlhf.losses import group_advantages, grpo_loss, k3_kl


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- by hand

def test_group_advantages_by_hand():
    # group 1: rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 0.577350
    # group 2: all 2: no spread, advantages 0 (not NaN)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    a = 0.5 / (0.577350 + 1e-4)
    close(group_advantages(rewards, 4), [a, -a, -a, a, 0, 0, 0, 0], tol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(rewards, 3)


def test_k3_by_hand():
    # log ref - log pi = d: kl = e^d - d - 1: d = 0 -> 0; d = 1 -> e - 2 = 0.718282; d = -1 -> 1/e = 0.367879
    logprobs, ref = torch.tensor([[-1.0, -2.0, -1.0, 5.0]]), torch.tensor([[-1.0, -1.0, -2.0, -50.0]])
    close(k3_kl(logprobs, ref, torch.tensor([[1, 1, 1, 0]])), [[0.0, 0.718282, 0.367879, 0.0]])


def test_grpo_loss_worked_example():
    # two completions, advantages +1 and -1, clip 0.2, beta 0.5
    # row 1: ratios 1.5 (clipped to 1.2: -min(1.5, 1.2) = -1.2) and 1.0 (-1.0); kl 0 and e - 2
    #        token losses -1.2 and -1 + 0.5 * 0.718282 = -0.640859; mean -0.920430
    # row 2 (A = -1): ratio 0.5 -> -min(-0.5, -0.8) = 0.8; kl 0; one token (the second is masked)
    logprobs = torch.tensor([[math.log(1.5), -2.0], [math.log(0.5), 9.0]], requires_grad=True)
    old = torch.tensor([[0.0, -2.0], [0.0, 0.0]])
    ref = torch.tensor([[math.log(1.5), -1.0], [math.log(0.5), 0.0]])
    mask, advantages = torch.tensor([[1, 1], [1, 0]]), torch.tensor([1.0, -1.0])
    loss, kl, clip_fraction = grpo_loss(logprobs, old, ref, advantages, mask, clip=0.2, beta=0.5)
    close(loss, ((-1.2 - 0.640859) / 2 + 0.8) / 2)
    close(kl, 0.718282 / 3)
    close(clip_fraction, 2 / 3)  # rho 1.5 with A > 0 and rho 0.5 with A < 0
    token_loss, _, _ = grpo_loss(logprobs, old, ref, advantages, mask, clip=0.2, beta=0.5, aggregate="token")
    close(token_loss, (-1.2 - 0.640859 + 0.8) / 3)
    loss.backward()
    # only row 1's second token has a gradient: d/dlogp [-rho A + beta (e^(ref - logp) - (ref - logp) - 1)]
    # = -1 + 0.5 * (1 - e) = -1.859141, over 2 tokens and 2 rows
    close(logprobs.grad, [[0.0, -1.859141 / 4], [0.0, 0.0]])


def test_grpo_loss_rejects_an_unknown_aggregation():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown aggregate 'sum'"):
        grpo_loss(x, x, x, torch.zeros(1), x, aggregate="sum")


# ----------------------------------------------------------------------------- TRL as the reference

@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl", reason="TRL is the test-only reference: pip install --no-deps trl==1.16.0")
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.utils import nanstd
    return types.SimpleNamespace(GRPOTrainer=GRPOTrainer, nanstd=nanstd)


def _random_batch(seed: int, groups: int = 3, k: int = 4, width: int = 7):
    """Per-token log-probs of a policy (a leaf, for gradients), of the sampling policy (drifted up to
    +-0.5 nats, so ratios fall on both sides of the clip range), of a reference; completions of
    different lengths (at least one token); advantages from random rewards."""
    g = torch.Generator().manual_seed(seed)
    n = groups * k
    logprobs = (-3 * torch.rand(n, width, generator=g)).requires_grad_()
    old = logprobs.detach() + (torch.rand(n, width, generator=g) - 0.5)
    ref = logprobs.detach() + 0.7 * torch.randn(n, width, generator=g)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).long()
    rewards = torch.randint(0, 3, (n,), generator=g).float() + 0.1 * torch.randn(n, generator=g)
    return logprobs, old, ref, mask, rewards, k


def _trl_loss(trl, logprobs, old, ref, mask, advantages, loss_type, clip, beta):
    """TRL 1.16's GRPOTrainer._compute_loss (grpo_trainer.py lines 3020-3290) on these log-probs: the
    stand-in's _get_per_token_logps_and_entropies returns them instead of running a model."""
    n, width = logprobs.shape
    identity = lambda x, **_: x  # noqa: E731  one process: gathering and reducing are the identity
    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    stand_in = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logprobs, torch.zeros_like(logprobs), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        loss_type=loss_type, epsilon_low=clip, epsilon_high=clip, beta=beta, use_vllm=False,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False),
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=types.SimpleNamespace(gather=identity, reduce=identity, num_processes=1), _metrics=metrics)
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, width, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref}
    return trl.GRPOTrainer._compute_loss(stand_in, None, inputs), metrics["train"]


def _trl_advantages(trl, rewards: torch.Tensor, k: int) -> torch.Tensor:
    """TRL 1.16's normalisation with its defaults (scale_rewards="group", multi_objective_aggregation=
    "sum_then_normalize"), grpo_trainer.py lines 2761-2787, with TRL's own nanstd."""
    mean = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    std = trl.nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    return (rewards - mean) / (std + 1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_trl(trl, seed):
    _, _, _, _, rewards, k = _random_batch(seed)
    rewards[:k] = 1.5  # one group without spread
    close(group_advantages(rewards, k), _trl_advantages(trl, rewards, k))


@pytest.mark.parametrize("aggregate, loss_type", [("sequence", "grpo"), ("token", "bnpo")])
@pytest.mark.parametrize("clip, beta", [(0.2, 0.04), (0.2, 0.0), (0.1, 0.5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_loss_and_gradients_match_trl(trl, aggregate, loss_type, clip, beta, seed):
    logprobs, old, ref, mask, rewards, k = _random_batch(seed)
    advantages = group_advantages(rewards, k)
    expected, metrics = _trl_loss(trl, logprobs, old, ref, mask, advantages, loss_type, clip, beta)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    loss, kl, clip_fraction = grpo_loss(logprobs, old, ref, advantages, mask, clip=clip, beta=beta,
                                        aggregate=aggregate)
    (grad,) = torch.autograd.grad(loss, logprobs)
    close(loss, expected.detach())
    close(grad, expected_grad)
    assert expected_grad.abs().max() > 1e-3  # the comparison is not of zeros
    close(clip_fraction, metrics["clip_ratio/region_mean"][0])
    assert 0 < clip_fraction < 1
    if beta:
        close(kl, metrics["kl"][0])
