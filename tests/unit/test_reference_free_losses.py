"""ORPO and SimPO losses: values worked out by hand, and TRL 1.16's own trainer code as the reference
(its ORPOTrainer and its CPOTrainer with loss_type="simpo", cpo_alpha=0), called with a minimal
stand-in for the trainer: on random log-probabilities and on a tiny causal LM, loss and gradients."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch

from deltatune.rlhf.losses import log_odds, orpo_loss, sequence_logps, simpo_loss


def close(actual, expected, tol=1e-6, rtol=0.0):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=rtol)


# ----------------------------------------------------------------------------- by hand

def test_log_odds_by_hand():
    # p = 0.5: odds 1, log 0; p = 0.8: odds 4; p = 0.1: odds 1/9
    close(log_odds(torch.tensor([math.log(0.5), math.log(0.8), math.log(0.1)])), [0.0, math.log(4), -math.log(9)])


def test_log_odds_of_probability_one_stays_finite():
    """A response predicted with probability 1 in float32 (log-probability exactly 0): no inf, no NaN."""
    x = torch.tensor([0.0, -1e-30, -0.5], requires_grad=True)
    h = log_odds(x)
    # log odds of p = exp(-1e-12): log(1 / (1 - p)) = -log(1e-12) = 27.63
    assert torch.isfinite(h).all() and h[0].item() == h[1].item() == pytest.approx(-math.log(1e-12), rel=1e-4)
    loss, _, _ = orpo_loss(x[:1], x[2:], lam=1.0)
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_orpo_by_hand():
    # per-token mean probabilities 0.8 (chosen) and 0.5 (rejected): odds 4 and 1, h = log 4,
    # -log sigmoid(log 4) = log(1 + 1/4) = 0.223144; the SFT term -log 0.8 = 0.223144 as well
    chosen, rejected = torch.tensor([math.log(0.8)]), torch.tensor([math.log(0.5)])
    loss, sft, h = orpo_loss(chosen, rejected, lam=0.5)
    close(loss, 0.223144 + 0.5 * 0.223144)
    close(sft, 0.223144)
    close(h, [math.log(4)])
    close(orpo_loss(chosen, rejected, lam=0.0)[0], 0.223144)  # lam 0: SFT on the chosen response only
    # a given SFT term (one for the batch) replaces -chosen_logps
    close(orpo_loss(chosen, rejected, lam=0.5, chosen_nll=2.0)[0], 2.0 + 0.5 * 0.223144)
    # two pairs, the second one reversed: h = -log 4, -log sigmoid(-log 4) = log 5 = 1.609438
    pairs = orpo_loss(torch.tensor([math.log(0.8), math.log(0.5)]), torch.tensor([math.log(0.5), math.log(0.8)]), 1.0)
    close(pairs[0], ((0.223144 + 0.223144) + (math.log(2) + 1.609438)) / 2)


def test_simpo_by_hand():
    # rewards 2 * -1 = -2 and 2 * -2 = -4; -log sigmoid(-2 + 4 - 1) = -log sigmoid(1) = 0.313262
    loss, chosen, rejected = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=1.0)
    close(loss, 0.313262)
    close(chosen, [-2.0])
    close(rejected, [-4.0])
    # gamma 0 is the Bradley-Terry loss on the rewards: -log sigmoid(2) = 0.126928
    close(simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, gamma=0.0)[0], 0.126928)


@pytest.mark.parametrize("call, message", [(lambda x: orpo_loss(x, x, lam=-0.1), "lam=-0.1 must be 0 or more"),
                                           (lambda x: simpo_loss(x, x, beta=0.0), "beta=0.0 must be greater")])
def test_reference_free_losses_reject_bad_settings(call, message):
    with pytest.raises(ValueError, match=message):
        call(-torch.ones(2))


# ----------------------------------------------------------------------------- TRL as the reference

@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl", reason="TRL is the test-only reference: pip install --no-deps trl==1.16.0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "You are importing from 'trl.experimental'": that is where 1.16 keeps them
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return types.SimpleNamespace(ORPOTrainer=ORPOTrainer, CPOTrainer=CPOTrainer)


def _stand_in(trainer_cls, **attributes):
    """The attributes TRL 1.16's ORPOTrainer / CPOTrainer.get_batch_loss_metrics read from self, with the
    trainer's own methods bound to it."""
    identity = lambda x: x  # noqa: E731  one process: gathering is the identity
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=identity)
    self = types.SimpleNamespace(accelerator=accelerator, is_encoder_decoder=False, aux_loss_enabled=False,
                                 concatenated_inputs=trainer_cls.concatenated_inputs,
                                 get_batch_logps=trainer_cls.get_batch_logps, **attributes)
    for name in ("concatenated_forward", "odds_ratio_loss", "cpo_loss"):
        if hasattr(trainer_cls, name):
            setattr(self, name, types.MethodType(getattr(trainer_cls, name), self))
    return self


def _random_logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probabilities on both sides of log 1/2 (log1mexp's two branches), some near 0."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2, 32, generator=g) * 4 - 1e-4
    logps[:, :4] = -torch.rand(2, 4, generator=g) * 1e-2 - 1e-5
    return logps[0].clone().requires_grad_(), logps[1].clone().requires_grad_()


@pytest.mark.parametrize("lam", [0.1, 1.0, 2.5])
def test_odds_ratio_loss_and_gradients_match_trl(trl, lam):
    chosen, rejected = _random_logps(int(lam * 10))
    stand_in = _stand_in(trl.ORPOTrainer, beta=lam)
    # TRL returns beta * log sigmoid(h) per pair, the mean of log sigmoid(h) and the mean of h
    theirs, _, _, mean_log_sigmoid_h, mean_h = trl.ORPOTrainer.odds_ratio_loss(stand_in, chosen, rejected)
    expected = -theirs.mean()  # TRL: loss = nll - mean(beta * log sigmoid(h))
    expected_grads = torch.autograd.grad(expected, (chosen, rejected))
    loss, sft, h = orpo_loss(chosen, rejected, lam, chosen_nll=0.0)
    grads = torch.autograd.grad(loss, (chosen, rejected))
    close(loss, expected.detach())
    close(h.mean(), mean_h)
    close(torch.nn.functional.logsigmoid(h).mean(), mean_log_sigmoid_h)
    # Near log p = 0 the gradients grow (d log odds / d log p = 1 / (1 - p)) and float32 rounds TRL's and our
    # differently associated sums to about 1e-7 of their size: they agree to 1e-6 absolute plus 1e-6 relative.
    for ours, reference in zip(grads, expected_grads):
        close(ours, reference, rtol=1e-6)


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (0.1, 0.5), (2.5, 0.0)])
def test_simpo_loss_and_gradients_match_trl_cpo(trl, beta, gamma):
    chosen, rejected = _random_logps(int(beta * 10 + gamma))
    stand_in = _stand_in(trl.CPOTrainer, beta=beta, simpo_gamma=gamma, loss_type="simpo", alpha=0.0,
                         label_smoothing=0.0)
    theirs, chosen_rewards, rejected_rewards = trl.CPOTrainer.cpo_loss(stand_in, chosen, rejected)
    expected_grads = torch.autograd.grad(theirs.mean(), (chosen, rejected))
    loss, ours_chosen, ours_rejected = simpo_loss(chosen, rejected, beta, gamma)
    grads = torch.autograd.grad(loss, (chosen, rejected))
    close(loss, theirs.mean().detach())
    close(ours_chosen, chosen_rewards)
    close(ours_rejected, rejected_rewards)
    for ours, reference in zip(grads, expected_grads):
        close(ours, reference)


def _tiny_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def pairs():
    """3 pairs of random tokens, prompts and responses of different lengths, in TRL's batch layout
    (chosen_* and rejected_* tensors, right-padded, labels -100 on the prompt and the padding)."""
    ids = torch.randint(1, 50, (6, 10), generator=torch.Generator().manual_seed(0))
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, end) in enumerate([(3, 9), (2, 6), (4, 10), (3, 7), (2, 10), (4, 8)]):
        attention[row, :end] = 1
        labels[row, prompt:end] = ids[row, prompt:end]
    ids = ids * attention  # padding id 0
    batch = {}
    for side, rows in (("chosen", slice(0, 3)), ("rejected", slice(3, 6))):
        batch |= {f"{side}_input_ids": ids[rows], f"{side}_attention_mask": attention[rows],
                  f"{side}_labels": labels[rows]}
    return _tiny_causal_lm(), batch, ids, attention, labels


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def _assert_same(loss, expected, grads, expected_grads):
    close(loss.detach(), expected.detach())
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_on_a_model_matches_trl(trl, pairs, lam):
    model, batch, ids, attention, labels = pairs
    stand_in = _stand_in(trl.ORPOTrainer, beta=lam, padding_value=0)
    expected, metrics = trl.ORPOTrainer.get_batch_loss_metrics(stand_in, model, batch)
    expected_grads = _grads(model, expected)

    logps = sequence_logps(model(input_ids=ids, attention_mask=attention).logits, labels, average=True)
    # TRL's SFT term: the cross-entropy of every token of the chosen sequences, prompts included
    shifted = ids.masked_fill(attention == 0, -100)[:3, 1:]
    logits = model(input_ids=ids, attention_mask=attention).logits[:3, :-1]
    trl_nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))
    loss, _, h = orpo_loss(logps[:3], logps[3:], lam, chosen_nll=trl_nll)
    _assert_same(loss, expected, _grads(model, loss), expected_grads)
    close(h.mean(), metrics["log_odds_chosen"])
    close(logps[:3].mean(), metrics["logps/chosen"])
    close(((h > 0).float().mean()), metrics["rewards/accuracies"])

    # Ours (the default SFT term): each chosen response's own per-token NLL, the prompt masked; it
    # differs from TRL's by exactly the difference of the two SFT terms.
    logps = sequence_logps(model(input_ids=ids, attention_mask=attention).logits, labels, average=True)
    ours, sft, _ = orpo_loss(logps[:3], logps[3:], lam)
    close(sft, -logps[:3].mean())
    close((ours - expected).detach(), sft - metrics["nll_loss"], tol=1e-5)
    assert abs(sft - metrics["nll_loss"]) > 1e-3


@pytest.mark.parametrize("beta, gamma", [(2.0, 1.0), (0.5, 0.3)])
def test_simpo_on_a_model_matches_trl_cpo(trl, pairs, beta, gamma):
    model, batch, ids, attention, labels = pairs
    stand_in = _stand_in(trl.CPOTrainer, beta=beta, simpo_gamma=gamma, loss_type="simpo", cpo_alpha=0.0, alpha=0.0,
                         label_smoothing=0.0, pad_token_id=0)
    expected, metrics = trl.CPOTrainer.get_batch_loss_metrics(stand_in, model, batch)
    expected_grads = _grads(model, expected)
    assert metrics["nll_loss"] == 0.0  # cpo_alpha = 0: SimPO, no behaviour-cloning term

    logps = sequence_logps(model(input_ids=ids, attention_mask=attention).logits, labels, average=True)
    loss, chosen, rejected = simpo_loss(logps[:3], logps[3:], beta, gamma)
    _assert_same(loss, expected, _grads(model, loss), expected_grads)
    close((chosen - rejected).mean(), metrics["rewards/margins"])
    close((chosen > rejected).float().mean(), metrics["rewards/accuracies"])
