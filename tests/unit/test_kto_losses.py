"""kto_loss: values worked out by hand, and against TRL 1.16's own KTO code (KTOTrainer._compute_loss,
called with a minimal stand-in for the trainer as the DPO tests do): on random per-token log-probs
and on a tiny random Llama, loss and gradients to 1e-6."""

from __future__ import annotations

import functools
import math
import types

import pytest
import torch

from deltatune.rlhf.losses import kto_loss, sequence_logps
from tests.unit.test_rlhf_losses import TRL_USES_DEPRECATED_API, _tiny_causal_lm, _trainer_stand_in, close


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- by hand

def test_kto_by_hand():
    # rows: desirable r = 2, undesirable r = -1, desirable r = -3 (log pi - log ref)
    policy, ref = torch.tensor([-1.0, -4.0, -6.0]), torch.tensor([-3.0, -3.0, -3.0])
    desirable = torch.tensor([True, False, True])
    # mismatched pairs: log-ratios 0.5 and 1.5 -> z0 = 1
    kl_policy, kl_ref = torch.tensor([-2.5, -1.5]), torch.tensor([-3.0, -3.0])
    loss, rewards, z0 = kto_loss(policy, ref, desirable, kl_policy, kl_ref, beta=0.5,
                                 desirable_weight=2.0, undesirable_weight=0.5)
    close(z0, 1.0)
    close(rewards, [1.0, -0.5, -1.5])
    expected = [2.0 * (1 - sigmoid(0.5 * (2 - 1))),      # 2 * 0.377541
                0.5 * (1 - sigmoid(0.5 * (1 - (-1)))),   # 0.5 * 0.268941
                2.0 * (1 - sigmoid(0.5 * (-3 - 1)))]     # 2 * 0.880797
    close(loss, sum(expected) / 3)  # the mean of the weighted losses, not a weighted mean
    assert sum(expected) / 3 == pytest.approx((0.755081 + 0.134471 + 1.761594) / 3, abs=1e-5)


def test_reference_point_is_clamped_at_zero_and_takes_no_gradient():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl_policy = torch.tensor([-5.0, -4.0], requires_grad=True)  # below the reference: a negative estimate
    loss, _, z0 = kto_loss(policy, torch.tensor([-1.0, -2.0]), torch.tensor([True, False]), kl_policy,
                           torch.tensor([-3.0, -3.0]), beta=1.0)
    assert z0.item() == 0.0
    close(loss, (0.5 + 0.5) / 2)  # r = 0 and z0 = 0: each row's loss is 1 - sigmoid(0)
    loss.backward()
    assert kl_policy.grad is None
    # d/dr of (1 - sigmoid(r)) / 2 at 0 is -1/8; of (1 - sigmoid(-r)) / 2 is +1/8
    close(policy.grad, [-0.125, 0.125])


def test_before_training_every_row_costs_half_its_weight():
    x = torch.tensor([-3.0, -7.0, -2.0, -9.0])
    loss, rewards, z0 = kto_loss(x, x, torch.tensor([True, True, True, False]), x[:2], x[:2],
                                 desirable_weight=1.0, undesirable_weight=2.0)
    close(loss, (3 * 0.5 + 2 * 0.5) / 4)
    assert z0.item() == 0.0 and rewards.abs().max().item() == 0.0


@pytest.mark.parametrize("kwargs, message", [({"beta": 0.0}, "beta=0.0 must be greater than 0"),
                                             ({"desirable_weight": 0.0}, "must both be greater than 0"),
                                             ({"undesirable_weight": -1.0}, "must both be greater than 0")])
def test_kto_rejects_bad_settings(kwargs, message):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        kto_loss(x, x, torch.tensor([True, False]), x, x, **kwargs)


def test_kto_needs_mismatched_pairs_and_one_label_per_row():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="no mismatched pairs"):
        kto_loss(x, x, torch.tensor([True, False]), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="one label per row"):
        kto_loss(x, x, torch.tensor([True]), x, x)


# ----------------------------------------------------------------------------- TRL as the reference

@pytest.fixture(scope="module")
def kto_trainer():
    pytest.importorskip("trl", reason="TRL is the test-only reference: pip install --no-deps trl==1.16.0")
    from trl.trainer.kto_trainer import KTOTrainer
    return KTOTrainer


def _trl_kto(kto_trainer, policy, ref, batch, beta, desirable_weight, undesirable_weight):
    """TRL 1.16's KTO loss of ``batch``, its reference the separate ``ref`` model (not precomputed)."""
    stand_in = _trainer_stand_in(policy, ref_model=ref, beta=beta, desirable_weight=desirable_weight,
                                 undesirable_weight=undesirable_weight, loss_type="kto", calculate_KL=True,
                                 precompute_ref_logps=False, aux_loss_enabled=False,
                                 args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    stand_in._compute_kl_logps = functools.partial(kto_trainer._compute_kl_logps, stand_in)
    loss = kto_trainer._compute_loss(stand_in, policy, dict(batch), False)
    return loss, stand_in._metrics["eval"]


class TokenLogps(torch.nn.Module):
    """A stand-in causal LM for TRL's fused head: gives back fixed per-token log-probs ``(rows, T - 1)`` of
    each input it was made for (0 where the next token is not a completion token, as the fused head gives)."""

    is_gradient_checkpointing = False

    def __init__(self, table: dict):
        super().__init__()
        self.table = table  # id(input_ids) -> per-token log-probs
        self.eval()

    def forward(self, input_ids, labels, **_):
        logps = self.table[id(input_ids)]
        zeros = torch.zeros_like(logps)
        return types.SimpleNamespace(log_probs=logps.masked_fill(labels[:, 1:] == -100, 0.0), entropy=zeros,
                                     mean_logits=zeros)


def _random_batch(rows: int, width: int, seed: int) -> dict:
    """Completion masks of random lengths after random prompts; the KL rows are as wide, masked likewise."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for prefix in ("", "KL_"):
        ids = torch.randint(0, 50, (rows, width), generator=g)
        attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
        for row in range(rows):
            prompt = int(torch.randint(1, width // 2, (1,), generator=g))
            end = int(torch.randint(prompt + 1, width + 1, (1,), generator=g))
            attention[row, :end], completion[row, prompt:end] = 1, 1
        batch |= {f"{prefix}input_ids": ids, f"{prefix}attention_mask": attention,
                  f"{prefix}completion_mask": completion}
    return batch


@pytest.mark.filterwarnings(TRL_USES_DEPRECATED_API)
@pytest.mark.parametrize("seed, beta, weights, kl_scale", [
    (0, 0.1, (1.0, 1.0), 2.0), (1, 0.5, (1.0, 1.33), 2.0), (2, 2.0, (0.7, 1.0), 3.0),
    (3, 0.05, (1.0, 1.0), 8.0)])  # kl_scale 8: the policy's mismatched log-probs below the reference's, z0 clamped
def test_kto_loss_and_gradients_match_trl_on_random_log_probs(kto_trainer, seed, beta, weights, kl_scale):
    rows, width = 7, 9
    batch = _random_batch(rows, width, seed)
    g = torch.Generator().manual_seed(100 + seed)
    batch["label"] = torch.rand(rows, generator=g) < 0.5
    batch["label"][:2] = torch.tensor([True, False])  # both kinds in every batch
    # log-probs on a wide range: some log-ratios far from z0, so the sigmoids are not all near 1/2
    per_token = {name: -torch.rand(rows, width - 1, generator=g) * (kl_scale if name == "pk" else 4)
                 for name in ("p", "r", "pk", "rk")}
    policy_tokens = per_token["p"].clone().requires_grad_()
    policy = TokenLogps({id(batch["input_ids"]): policy_tokens, id(batch["KL_input_ids"]): per_token["pk"]})
    ref = TokenLogps({id(batch["input_ids"]): per_token["r"], id(batch["KL_input_ids"]): per_token["rk"]})
    trl_loss, metrics = _trl_kto(kto_trainer, policy, ref, batch, beta, *weights)
    trl_loss.backward()
    trl_grad = policy_tokens.grad.clone()

    policy_tokens.grad = None
    sums = {name: (t * batch[f"{'KL_' if 'k' in name else ''}completion_mask"][:, 1:]).sum(-1)
            for name, t in {**per_token, "p": policy_tokens}.items()}
    loss, rewards, z0 = kto_loss(sums["p"], sums["r"], batch["label"], sums["pk"], sums["rk"], beta, *weights)
    loss.backward()
    close(loss, trl_loss.detach(), tol=1e-6)
    torch.testing.assert_close(policy_tokens.grad, trl_grad, atol=1e-6, rtol=1e-6)
    assert (rewards / beta).abs().max() > 2  # log-ratios far from 0: not only the sigmoids' middle
    assert (z0.item() > 0.5) if kl_scale < 4 else (z0.item() == 0.0)
    close(z0, metrics["kl"][0], tol=1e-6)
    close(rewards[batch["label"]].mean(), metrics["rewards/chosen"][0], tol=1e-6)
    close(rewards[~batch["label"]].mean(), metrics["rewards/rejected"][0], tol=1e-6)


@pytest.fixture(scope="module")
def kto_models(kto_trainer):
    from trl.trainer.utils import add_fused_lm_head

    policy, ref = _tiny_causal_lm(0), _tiny_causal_lm(1)
    for model in (policy, ref):  # as TRL's trainer patches its models; the plain forward is unchanged
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
    return policy, ref


@pytest.mark.filterwarnings(TRL_USES_DEPRECATED_API)
@pytest.mark.parametrize("seed, beta, weights", [(0, 0.1, (1.0, 1.0)), (1, 1.0, (1.33, 1.0)), (2, 3.0, (1.0, 0.5))])
def test_kto_loss_and_gradients_match_trl_on_a_tiny_llama(kto_trainer, kto_models, seed, beta, weights):
    """TRL's KTOTrainer scores the completions and the mismatched pairs itself (policy and reference model);
    ours takes sequence_logps of the same batch: loss and every parameter's gradient agree."""
    policy, ref = kto_models
    batch = _random_batch(6, 10, seed)
    batch["label"] = torch.tensor([True, False, True, True, False, False])[torch.randperm(
        6, generator=torch.Generator().manual_seed(seed))]
    policy.zero_grad()
    trl_loss, metrics = _trl_kto(kto_trainer, policy, ref, batch, beta, *weights)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in policy.parameters()]

    policy.zero_grad()
    scored = {}
    for prefix in ("", "KL_"):
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"]
        labels = ids.masked_fill(batch[f"{prefix}completion_mask"] == 0, -100)
        with torch.set_grad_enabled(prefix == ""):
            scored[prefix] = sequence_logps(policy(input_ids=ids, attention_mask=mask).logits, labels)
        with torch.no_grad():
            scored["ref_" + prefix] = sequence_logps(ref(input_ids=ids, attention_mask=mask).logits, labels)
    loss, _, z0 = kto_loss(scored[""], scored["ref_"], batch["label"], scored["KL_"], scored["ref_KL_"], beta,
                           *weights)
    loss.backward()
    close(loss, trl_loss.detach(), tol=1e-6)
    close(z0, metrics["kl"][0], tol=1e-6)
    assert z0.item() > 0  # the mismatched pairs moved the reference point
    for ours, theirs in zip((p.grad for p in policy.parameters()), trl_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
