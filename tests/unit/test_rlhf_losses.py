"""RLHF losses: hand-computed values on tiny tensors (the arithmetic is written out), and the
pairwise and DPO losses against TRL's own trainer code as a reference."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

from deltatune.rlhf.losses import (AdaptiveKLController, dpo_loss, entropy_from_logits, gae, kl_penalty_rewards,
                                   listwise_loss, masked_mean, pairwise_accuracy, pairwise_loss, ppo_policy_loss,
                                   sequence_logps, value_loss, whiten)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def softplus(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- reward model losses

def test_pairwise_loss_by_hand():
    r_c, r_r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    # differences 2 and -1: -log sigmoid(2) = log(1 + e^-2) = 0.126928, -log sigmoid(-1) = log(1 + e) = 1.313262
    close(pairwise_loss(r_c, r_r), (0.126928 + 1.313262) / 2)
    # a margin of 1 shifts them to 1 and -2: log(1 + e^-1) = 0.313262, log(1 + e^2) = 2.126928
    close(pairwise_loss(r_c, r_r, margin=1.0), (0.313262 + 2.126928) / 2)
    close(pairwise_loss(r_c, r_r, margin=torch.tensor([1.0, 0.0])), (0.313262 + 1.313262) / 2)


def test_pairwise_accuracy_counts_ties_as_wrong():
    close(pairwise_accuracy(torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([0.0, 1.0, 1.0, 4.0])), 0.5)


def test_listwise_loss_by_hand():
    scores = torch.tensor([[3.0, 1.0, 0.0]])
    # -[(3 - log(e^3 + e + 1)) + (1 - log(e + 1)) + (0 - log 1)] = 0.169846 + 0.313262 + 0
    expected = -((3 - math.log(math.e ** 3 + math.e + 1)) + (1 - math.log(math.e + 1)))
    close(listwise_loss(scores), expected)
    assert expected == pytest.approx(0.169846 + 0.313262, abs=1e-5)


def test_listwise_loss_masks_short_rankings_and_averages_over_rows():
    scores = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 2 ranks only two responses: -(2 - log(e^2 + 1)) = log(1 + e^-2) = 0.126928; 99 plays no part
    close(listwise_loss(scores, mask), ((0.169846 + 0.313262) + 0.126928) / 2)


def test_listwise_loss_of_two_is_the_pairwise_loss():
    torch.manual_seed(0)
    s = torch.randn(5, 2)
    close(listwise_loss(s), pairwise_loss(s[:, 0], s[:, 1]))


# ----------------------------------------------------------------------------- DPO

def test_sequence_logps_by_hand():
    # vocab of 2; position 0 predicts labels[1] = 0 from logits [0, 0]: log 1/2 = -0.693147
    #             position 1 predicts labels[2] = 1 from logits [0, ln 3]: log 3/4 = -0.287682
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    close(sequence_logps(logits, labels), [-0.693147 - 0.287682])
    close(sequence_logps(logits, labels, average=True), [(-0.693147 - 0.287682) / 2])
    # a soft prompt's virtual token in front of the text is dropped, as in causal_lm_loss
    with_virtual = torch.cat([torch.tensor([[[9.0, -9.0]]]), logits], dim=1)
    close(sequence_logps(with_virtual, labels), [-0.693147 - 0.287682])
    close(sequence_logps(logits, torch.full((1, 3), -100), average=True), [0.0])


def test_dpo_sigmoid_by_hand():
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1, so h = 2; beta h = 1
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, chosen, rejected = dpo_loss(*args, beta=0.5)
    close(loss, 0.313262)  # -log sigmoid(1)
    close(chosen, [0.5])
    close(rejected, [-0.5])
    # conservative DPO: 0.9 * -log sigmoid(1) + 0.1 * -log sigmoid(-1) = 0.9 * 0.313262 + 0.1 * 1.313262
    close(dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0], 0.413262)


def test_dpo_ipo_by_hand():
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    close(dpo_loss(*args, beta=0.5, loss_type="ipo")[0], (2 - 1 / (2 * 0.5)) ** 2)  # (2 - 1)^2 = 1
    close(dpo_loss(*args, beta=0.25, loss_type="ipo")[0], 0.0)  # h = 1 / (2 tau): the IPO optimum


@pytest.mark.parametrize("kwargs, message", [({"loss_type": "hinge"}, "unknown DPO loss_type"),
                                             ({"label_smoothing": 0.5}, "must be in"),
                                             ({"loss_type": "ipo", "label_smoothing": 0.1}, "sigmoid")])
def test_dpo_rejects_bad_settings(kwargs, message):
    x = torch.zeros(1)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, **kwargs)


# ----------------------------------------------------------------------------- PPO

def test_clipped_surrogate_worked_example():
    # token  A    ratio  -A*ratio  -A*clip(ratio, 0.8, 1.2)  max (the loss)
    #   1   +1    1.5     -1.5      -1.2                     -1.2  clipped above: no gradient
    #   2   -1    0.5      0.5       0.8                      0.8  clipped below: no gradient
    #   3   +2    0.5     -1.0      -1.6                     -1.0  below the range but A > 0: kept
    #   4   -1    1.1      1.1       1.1                      1.1  inside the range
    #   5   (masked: garbage that must not count)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.1, 7.0]])
    logprobs = ratio.log().requires_grad_()
    old = torch.zeros(1, 5)
    advantages = torch.tensor([[1.0, -1.0, 2.0, -1.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    close(loss, (-1.2 + 0.8 - 1.0 + 1.1) / 4)  # -0.075
    close(clip_fraction, 2 / 4)
    # 0.5 * mean(log^2 ratio) = 0.5 * (0.164402 + 0.480453 + 0.480453 + 0.009084) / 4
    close(approx_kl, 0.141799)
    loss.backward()
    # d/dlogp of -A * ratio / 4 is -A * ratio / 4: token 3 -> -2 * 0.5 / 4, token 4 -> 1 * 1.1 / 4
    close(logprobs.grad, [[0.0, 0.0, -0.25, 0.275, 0.0]])


def test_value_loss_worked_example():
    #  v    v_old  R     (v-R)^2   v_clip = v_old + clip(v - v_old, +-0.2)   (v_clip-R)^2   max
    # 1.0   0.5   2.0     1.00     0.7                                       1.69           1.69
    # 0.0   0.5   1.0     1.00     0.3                                       0.49           1.00
    # 2.0   2.1   2.0     0.00     2.0                                       0.00           0.00
    values, old = torch.tensor([[1.0, 0.0, 2.0, 3.0]]), torch.tensor([[0.5, 0.5, 2.1, 0.0]])
    returns, mask = torch.tensor([[2.0, 1.0, 2.0, -9.0]]), torch.tensor([[1, 1, 1, 0]])
    close(value_loss(values, old, returns, mask, clip=0.2), 0.5 * (1.69 + 1.0 + 0.0) / 3)


def test_gae_matches_the_unrolled_recursion():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [7.0, 1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0], [3.0, 0.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # row 1: padding after; row 2: a prompt before
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 1, last response token t=2: nothing after it (V_3 = A_3 = 0)
    d2 = 1 + gamma * 0 - 0.4                 # 0.6
    d1 = 0 + gamma * 0.4 - 0.2               # 0.16
    d0 = 0 + gamma * 0.2 - 0.5               # -0.32
    a2 = d2
    a1 = d1 + gamma * lam * a2               # 0.592
    a0 = d0 + gamma * lam * a1               # 0.10624
    # row 2, tokens 1..3
    e3 = 2 - 1.0                             # 1
    e2 = 0 + gamma * 1.0 - 1.0               # -0.1
    e1 = 1 + gamma * 1.0 - 0.0               # 1.9
    b3 = e3
    b2 = e2 + gamma * lam * b3               # 0.62
    b1 = e1 + gamma * lam * b2               # 2.3464
    close(advantages, [[a0, a1, a2, 0.0], [0.0, b1, b2, b3]])
    close(returns, [[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0], [0.0, b1 + 0.0, b2 + 1.0, b3 + 1.0]])
    assert a0 == pytest.approx(0.10624) and b1 == pytest.approx(2.3464)


def test_gae_with_gamma_and_lambda_one_returns_the_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    values = torch.tensor([[0.3, -0.4, 0.9, 0.0]])
    _, returns = gae(rewards, values, torch.tensor([[1, 1, 1, 0]]), gamma=1.0, lam=1.0)
    close(returns, [[6.0, 5.0, 3.0, 0.0]])


def test_whiten_by_hand():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
    close(whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]])
    close(whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2"):
        whiten(x, torch.tensor([[1, 0, 0, 0]]))


def test_kl_penalty_rewards_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [5.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [0.0, -1.0, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    rewards = kl_penalty_rewards(logprobs, ref, torch.tensor([3.0, -1.0]), mask, kl_coef=0.1)
    # row 1: KL per token 0.5, -1, 0 -> -0.05, 0.1, 0; the score 3 lands on token 2, the last response token
    # row 2: KL per token 0, 1, 0 on tokens 1..3 -> 0, -0.1, 0; the score -1 lands on token 3
    close(rewards, [[-0.05, 0.1, 3.0, 0.0], [0.0, 0.0, -0.1, -1.0]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no response tokens"):
        kl_penalty_rewards(logprobs, ref, torch.zeros(2), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 0.1)


def test_adaptive_kl_controller_moves_toward_the_target():
    kl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 12 is twice the target: error 1, clipped to 0.2 -> 0.2 * (1 + 0.2 * 256 / 10000)
    assert kl.update(12.0, n_steps=256) == pytest.approx(0.2 * 1.00512)
    before = kl.value
    assert kl.update(6.6, 256) == pytest.approx(before * (1 + 0.1 * 256 / 10000))  # error 0.1, unclipped
    before = kl.value
    assert kl.update(1.0, 256) == pytest.approx(before * (1 - 0.2 * 256 / 10000))  # too little KL: lower
    before = kl.value
    assert kl.update(6.0, 256) == pytest.approx(before)  # on target: unchanged


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]])
    close(entropy_from_logits(logits, torch.tensor([[1, 0]])), math.log(2))
    # p = (1/4, 3/4): 0.25 ln 4 + 0.75 ln(4/3) = 0.562335
    close(entropy_from_logits(logits, torch.tensor([[1, 1]])), (0.693147 + 0.562335) / 2)


def test_masked_mean_of_nothing_is_zero():
    close(masked_mean(torch.tensor([float("nan"), 1.0]), torch.tensor([0, 0])), 0.0)


# ----------------------------------------------------------------------------- TRL as the reference

@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl", reason="TRL is the test-only reference: pip install --no-deps trl==1.16.0")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.reward_trainer import RewardTrainer
    from trl.trainer.utils import add_fused_lm_head
    return types.SimpleNamespace(DPOTrainer=DPOTrainer, RewardTrainer=RewardTrainer, add_fused_lm_head=add_fused_lm_head)


def _trainer_stand_in(model, **attributes):
    """The attributes TRL 1.16's DPOTrainer._compute_loss / RewardTrainer.compute_loss read from self."""
    identity = lambda x: x  # noqa: E731  one process: gathering is the identity
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity)
    metrics = collections.defaultdict(lambda: collections.defaultdict(list))
    return types.SimpleNamespace(model=model, accelerator=accelerator, _metrics=metrics, _total_train_tokens=0,
                                 _tp_size=1, **attributes)


def _tiny_causal_lm(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def dpo_batch(trl):
    """A policy, a reference and 3 pairs (rows 0-2 chosen, 3-5 rejected) of random tokens with
    prompts and responses of different lengths, right-padded: TRL's batch layout."""
    policy, ref = _tiny_causal_lm(0), _tiny_causal_lm(1)
    for model in (policy, ref):  # TRL's trainer patches its models so; the plain forward is unchanged
        trl.add_fused_lm_head(model, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    ids = torch.randint(0, 50, (6, 10), generator=torch.Generator().manual_seed(0))
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (prompt, end) in enumerate([(3, 9), (2, 6), (4, 10), (3, 7), (2, 10), (4, 8)]):
        attention[row, :end], completion[row, prompt:end] = 1, 1
    return policy, ref, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def _trl_dpo(trl, policy, ref, inputs, loss_type, beta):
    stand_in = _trainer_stand_in(policy, ref_model=ref, beta=beta, loss_types=[loss_type], loss_weights=[1.0],
                                 label_smoothing=0.0, f_divergence_type="reverse_kl", ld_alpha=None,
                                 precompute_ref_logps=False, use_weighting=False, aux_loss_enabled=False,
                                 args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    loss = trl.DPOTrainer._compute_loss(stand_in, policy, dict(inputs), False)
    return loss, stand_in._metrics["eval"]


def _our_dpo(policy, ref, inputs, **kwargs):
    average = kwargs.get("loss_type") == "ipo"  # the caller's side of the IPO contract
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    policy_logps = sequence_logps(policy(**model_inputs).logits, labels, average=average)
    with torch.no_grad():
        ref_logps = sequence_logps(ref(**model_inputs).logits, labels, average=average)
    return dpo_loss(policy_logps[:3], policy_logps[3:], ref_logps[:3], ref_logps[3:], **kwargs)


TRL_USES_DEPRECATED_API = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"  # inside TRL 1.16


@pytest.mark.filterwarnings(TRL_USES_DEPRECATED_API)
@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.7), ("ipo", 0.1), ("ipo", 0.7)])
def test_dpo_loss_and_gradients_match_trl(trl, dpo_batch, loss_type, beta):
    policy, ref, inputs = dpo_batch
    policy.zero_grad()
    trl_loss, metrics = _trl_dpo(trl, policy, ref, inputs, loss_type, beta)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    loss, chosen, rejected = _our_dpo(policy, ref, inputs, beta=beta, loss_type=loss_type)
    loss.backward()
    close(loss, trl_loss.detach())
    for ours, theirs in zip((p.grad for p in policy.parameters()), trl_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)
    if loss_type == "sigmoid":  # for IPO we return per-token-mean rewards, TRL logs summed ones
        close(chosen.mean(), metrics["rewards/chosen"][0])
        close(rejected.mean(), metrics["rewards/rejected"][0])


@pytest.mark.filterwarnings(TRL_USES_DEPRECATED_API)
def test_conservative_dpo_matches_trls_smoothed_formula(trl, dpo_batch):
    """TRL 1.16's "sigmoid" ignores label_smoothing; its "aot" loss uses the same smoothed
    formula on a batch-sorted h, which for one pair is h itself."""
    policy, ref, inputs = dpo_batch
    for pair in range(3):
        one = {k: v[[pair, pair + 3]] for k, v in inputs.items()}
        stand_in = _trainer_stand_in(policy, ref_model=ref, beta=0.5, loss_types=["aot"], loss_weights=[1.0],
                                     label_smoothing=0.2, f_divergence_type="reverse_kl", ld_alpha=None,
                                     precompute_ref_logps=False, use_weighting=False, aux_loss_enabled=False,
                                     args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
        with torch.no_grad():
            expected = trl.DPOTrainer._compute_loss(stand_in, policy, one, False)
            labels = one["input_ids"].masked_fill(one["completion_mask"] == 0, -100)
            p = sequence_logps(policy(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits, labels)
            r = sequence_logps(ref(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits, labels)
        close(dpo_loss(p[:1], p[1:], r[:1], r[1:], beta=0.5, label_smoothing=0.2)[0], expected)


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_loss_matches_trl_reward_trainer(trl, with_margin):
    torch.manual_seed(0)
    chosen, rejected, margin = torch.randn(8) * 3, torch.randn(8) * 3, torch.rand(8)
    reward_model = lambda **_: types.SimpleNamespace(logits=torch.cat([chosen, rejected]).unsqueeze(-1))  # noqa: E731
    stand_in = _trainer_stand_in(types.SimpleNamespace(training=False),
                                 args=types.SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"attention_mask": torch.ones(16, 4)} | ({"margin": margin} if with_margin else {})
    expected = trl.RewardTrainer.compute_loss(stand_in, reward_model, inputs)
    close(pairwise_loss(chosen, rejected, margin if with_margin else None), expected)
    close(pairwise_accuracy(chosen, rejected), stand_in._metrics["eval"]["accuracy"][0])
