"""Losses for reward models, DPO and PPO, as pure functions of tensors.

Shapes: ``(batch,)`` for per-sequence quantities, ``(batch, T)`` for per-token ones, where a
``mask`` of the same shape is 1 on the tokens that count (response tokens) and 0 elsewhere.
Masked positions may hold anything (padding, -inf log-probs): they never reach a result.
A mean over a mask with no tokens is 0, not NaN, so an empty micro-batch does not poison a step.

The DPO formulas follow TRL's DPOTrainer (v1.16) and the PPO ones TRL's former PPOTrainer
(v0.x), which follow Ziegler et al. 2019 and Stiennon et al. 2020; each docstring says where
they differ.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy("torch")
F = lazy("torch.nn.functional")

IGNORE = -100


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """``sum(x * m) / max(sum(m), 1)`` over every element."""
    mask = mask.bool()
    return torch.where(mask, x, torch.zeros_like(x)).sum() / mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------- reward models

def pairwise_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None) -> Tensor:
    """Bradley-Terry loss for a reward model (Ouyang et al. 2022, eq. 1; Llama 2's margin):

        L = mean_b -log sigmoid(r_c - r_r - m)

    ``margin`` m (a scalar or one per pair) asks the chosen reward to win by at least that much;
    None means 0.
    """
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Fraction of pairs with ``r_c > r_r`` (a tie counts as wrong)."""
    return (r_chosen > r_rejected).float().mean()


def listwise_loss(scores: Tensor, ranking_mask: Tensor | None = None) -> Tensor:
    """Plackett-Luce negative log-likelihood of a full ranking (Plackett 1975; Luce 1959):

        L = mean_b -sum_{i=1..k} [ s_i - log sum_{j=i..k} exp(s_j) ]

    ``scores`` is ``(batch, k)`` with each row already ordered best first. ``ranking_mask``
    ``(batch, k)`` marks the responses a row really has (rankings shorter than k): masked
    entries are left out of every term, the others keep their order. For k = 2 this is
    ``pairwise_loss``.
    """
    scores = scores.float()
    mask = torch.ones_like(scores, dtype=torch.bool) if ranking_mask is None else ranking_mask.bool()
    masked = scores.masked_fill(~mask, float("-inf"))
    # log sum_{j >= i} exp(s_j): a cumulative logsumexp from the worst end
    tail = masked.flip(-1).logcumsumexp(-1).flip(-1)
    terms = torch.where(mask, scores - tail, torch.zeros_like(scores))
    return -terms.sum(-1).mean()


# ----------------------------------------------------------------------------- DPO

def sequence_logps(logits: Tensor, labels: Tensor, average: bool = False) -> Tensor:
    """Log-probability of each sequence's labelled tokens, ``(batch,)``:

        log p(y | x) = sum_t log softmax(z_t)[labels_{t+1}]      (labels_{t+1} != -100)

    with the causal shift of ``deltatune.losses.causal_lm_loss`` (position t predicts
    ``labels[t + 1]``; soft-prompt positions at the front of ``logits`` are dropped).
    ``average=True`` divides by the number of labelled tokens (0 tokens give 0).
    """
    shifted = labels[:, 1:]
    logits = logits[:, -labels.shape[1]:-1].float()
    keep = shifted != IGNORE
    picked = logits.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = torch.where(keep, picked - logits.logsumexp(-1), torch.zeros_like(picked))
    total = token_logps.sum(-1)
    return total / keep.sum(-1).clamp(min=1) if average else total


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7) and IPO (Azar et al. 2023, eq. 17) on sequence log-probs.

    With the log-ratio difference  h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

        sigmoid:  L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
        ipo:      L = (h - 1 / (2 beta))^2          (beta is the paper's tau)

    averaged over the batch. eps = ``label_smoothing`` is conservative DPO (Mitchell 2023): the
    probability that a pair's label is flipped, in [0, 0.5).

    What to pass: for "sigmoid", summed log-probs (``sequence_logps(..., average=False)``) from
    the policy and the reference. For "ipo", per-token means (``average=True``) for both: the
    squared loss would otherwise grow with response length, and TRL normalises the same way
    (its sums divided by the number of response tokens).

    Returns (loss, chosen_rewards, rejected_rewards); the rewards ``beta * (log pi - log ref)``
    are detached, for logging. (For IPO they are per-token means, where TRL logs sums.)
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5): it is the probability "
                         "that a preference label is wrong")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the 'sigmoid' loss only; set it to 0 for 'ipo'")
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ----------------------------------------------------------------------------- PPO

def kl_penalty_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor, mask: Tensor,
                       kl_coef: float) -> Tensor:
    """Per-token rewards for PPO (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020):

        r_t = -kl_coef * (log pi(a_t) - log ref(a_t))  +  [t = last response token] * score

    ``logprobs``/``ref_logprobs``/``mask`` are ``(batch, T)``, ``scores`` the reward model's
    ``(batch,)``. Each row needs at least one response token. Rewards are data, so detached.
    """
    mask = mask.bool()
    if not mask.any(-1).all():
        empty = (~mask.any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no response tokens in mask; there is no token to give their score to")
    kl = (logprobs - ref_logprobs).detach().float()
    rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, -1).argmax(-1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.detach().float()
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                         (the value head's target)

    with V and A = 0 after each row's last response token (no bootstrapping: the episode ends
    there). ``mask`` must mark one contiguous run of tokens per row. Returns (advantages,
    returns), 0 on masked positions, without gradient. Advantages are not whitened: see ``whiten``.
    """
    with torch.no_grad():
        m = mask.to(values.dtype)
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
        rewards = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
        advantages = torch.zeros_like(values)
        next_value = next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            next_advantage = (delta + gamma * lam * next_advantage) * m[:, t]
            next_value = values[:, t]
            advantages[:, t] = next_advantage
        return advantages, advantages + values


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise over the masked tokens of the whole batch (unbiased variance, as TRL):

        (x - mean) / sqrt(var + 1e-8)          (+ mean again when ``shift_mean`` is False)

    Masked positions come back as 0. Needs at least two tokens.
    """
    count = int(mask.bool().sum())
    if count < 2:
        raise ValueError(f"whiten needs at least 2 unmasked values to estimate a variance, got {count}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * count / (count - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        rho_t = exp(log pi(a_t) - log pi_old(a_t))
        L     = masked_mean_t  max(-rho_t A_t, -clip(rho_t, 1 - eps, 1 + eps) A_t)

    i.e. ``-min(rho A, clip(rho) A)``. Returns (loss, clip_fraction, approx_kl):
    clip_fraction is the share of tokens where the clipped term is the larger loss (their
    gradient is 0); approx_kl = masked_mean 0.5 (log rho)^2, TRL's estimator of KL(old || new).
    ``old_logprobs`` and ``advantages`` are constants of the objective and are detached.
    """
    mask = mask.bool()
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> Tensor:
    """Clipped value loss (PPO2 baselines; Ziegler et al. 2019's lm-human-preferences):

        v_clip = v_old + clip(v - v_old, -eps, eps)
        L      = 0.5 * masked_mean max((v - R)^2, (v_clip - R)^2)

    ``old_values`` and ``returns`` are detached.
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def entropy_from_logits(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy of the next-token distributions on the masked positions:

        H_t = -sum_v p_v log p_v,   p = softmax(z_t)

    ``logits`` ``(batch, T, vocab)`` aligned with ``mask`` ``(batch, T)``.
    """
    logp = logits.float().log_softmax(-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


class AdaptiveKLController:
    """The KL coefficient that steers the policy's KL to the reference toward a target
    (Ziegler et al. 2019, section 2.2):

        e_t        = clip(KL_t / target - 1, -0.2, 0.2)
        beta_{t+1} = beta_t * (1 + e_t * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target ({target}) and horizon ({horizon}) must be positive")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient after ``n_steps`` samples at KL ``current_kl``; returns it."""
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ----------------------------------------------------------------------------- reference-free: ORPO, SimPO

def log_odds(logps: Tensor) -> Tensor:
    """The log odds of probabilities given as log-probabilities:

        log (p / (1 - p)) = log p - log(1 - exp(log p))

    ``log(1 - exp(x))`` is computed as TRL's ``log1mexp`` (``log1p(-exp x)`` below -ln 2,
    ``log(-expm1 x)`` above; Maechler 2012), so it is accurate at both ends. ``logps`` is clamped to
    at most -1e-12 first: a response the model gives probability 1 in float32 (log-probability 0)
    would otherwise have infinite odds, and its gradient would be inf * 0 = NaN.
    """
    x = logps.float().clamp(max=-1e-12)
    log1mexp = torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    return x - log1mexp


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, lam: float = 0.1,
              chosen_nll: Tensor | float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, eqs. 6-7): an SFT loss plus lam times the odds-ratio loss,

        h = log odds(y_w) - log odds(y_l),        odds(y) = p(y|x) / (1 - p(y|x))
        L = mean_b [ L_SFT - lam * log sigmoid(h) ]

    where p(y|x) is the per-token mean probability: ``chosen_logps`` and ``rejected_logps`` are
    length-averaged log-probabilities of the responses (``sequence_logps(..., average=True)``), as in
    the paper and TRL. No reference model. ``chosen_nll`` is the SFT term, one per pair or one for
    the batch; None means ``-chosen_logps``, each chosen response's per-token negative log-likelihood
    (the paper's L_SFT on y_w; the ORPO task's choice). TRL 1.16's ORPOTrainer passes instead the
    cross-entropy of all tokens of the batch's chosen sequences, prompts included.

    ``lam`` is TRL's ``beta``. Returns (loss, sft, h): the SFT term's batch mean and the log odds
    ratio of each pair, both detached, for logging.
    """
    if lam < 0:
        raise ValueError(f"lam={lam} must be 0 or more: it weighs the odds-ratio loss against the SFT loss")
    sft = -chosen_logps.float() if chosen_nll is None else torch.as_tensor(chosen_nll).float()
    h = log_odds(chosen_logps) - log_odds(rejected_logps)
    losses = sft - lam * F.logsigmoid(h)
    return losses.mean(), sft.detach().mean(), h.detach()


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float = 2.0,
               gamma: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): a Bradley-Terry loss on length-normalised rewards with a
    target margin, and no reference model,

        r(y) = beta / |y| * log p(y|x)
        L    = mean_b -log sigmoid(r(y_w) - r(y_l) - gamma)

    ``chosen_logps`` and ``rejected_logps`` are per-token mean log-probabilities
    (``sequence_logps(..., average=True)``). This is TRL 1.16's CPOTrainer with
    ``loss_type="simpo"`` and ``cpo_alpha=0`` (its ``simpo_gamma`` is gamma; no label smoothing).

    Returns (loss, chosen_rewards, rejected_rewards), the rewards ``beta * logps`` detached.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be greater than 0: it scales the length-normalised rewards")
    chosen = beta * chosen_logps.float()
    rejected = beta * rejected_logps.float()
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), chosen.detach(), rejected.detach()


# ----------------------------------------------------------------------------- KTO

def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, policy_kl_logps: Tensor,
             ref_kl_logps: Tensor, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, eqs. 7-8) on unpaired completions, each desirable or not.

    With each completion's log-ratio to the reference  r = log pi(y|x) - log ref(y|x)  (summed
    log-probs of the completion tokens) and the reference point

        z0 = max(0, mean_j [log pi(y'_j|x_j) - log ref(y'_j|x_j)])

    estimated on mismatched pairs (x_j, y'_j), a prompt with another row's completion, and detached:

        desirable:    l = desirable_weight   * (1 - sigmoid(beta * (r - z0)))
        undesirable:  l = undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

    L is the sum of l over all rows divided by the number of rows (TRL 1.16's KTOTrainer with
    ``loss_type="kto"``: the mean of the weighted losses, not a weighted mean). ``desirable`` is a
    bool per row (thumbs up). ``policy_kl_logps`` and ``ref_kl_logps`` hold one value per mismatched
    pair (at least one); z0 takes no gradient (TRL scores the mismatched pairs under no_grad).

    Returns (loss, rewards, z0): the rewards ``beta * r`` of each row and z0, both detached.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be greater than 0: it scales the log-ratios to the reference")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(f"desirable_weight={desirable_weight} and undesirable_weight={undesirable_weight} must both "
                         "be greater than 0: they weigh the two kinds of rows")
    if policy_kl_logps.numel() == 0:
        raise ValueError("no mismatched pairs: the reference point z0 is estimated from at least one")
    desirable = torch.as_tensor(desirable, device=policy_logps.device).bool()
    if desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable has shape {tuple(desirable.shape)}, the log-probs {tuple(policy_logps.shape)}; "
                         "give one label per row")
    z0 = (policy_kl_logps.float() - ref_kl_logps.float()).detach().mean().clamp(min=0)
    logratios = policy_logps.float() - ref_logps.float()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))))
    return losses.mean(), beta * logratios.detach(), z0


# ----------------------------------------------------------------------------- GRPO

def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Shao et al. 2024, section 4.1.2, outcome supervision): each completion's reward
    against the others sampled for the same prompt,

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)

    ``rewards`` ``(n_prompts * group_size,)``, each prompt's completions next to each other. std is the
    unbiased one (Bessel's correction) and eps = 1e-4, as TRL 1.16's default (``scale_rewards="group"``):
    a group whose rewards are all equal gets advantages 0. The same advantage applies to every token of a
    completion. Rewards are data, so the result is detached.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 completions to have a spread")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.detach().float().view(-1, group_size)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten()


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman 2020's "k3"; Shao et al.
    2024, eq. 4), unbiased and never negative; 0 on masked positions:

        kl_t = exp(log ref(o_t) - log pi(o_t)) - (log ref(o_t) - log pi(o_t)) - 1
    """
    keep = mask.bool()
    to_ref = torch.where(keep, ref_logprobs - logprobs, torch.zeros_like(logprobs))
    return to_ref.exp() - to_ref - 1


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor, advantages: Tensor, mask: Tensor,
              clip: float = 0.2, beta: float = 0.04, aggregate: str = "sequence") -> tuple[Tensor, Tensor, Tensor]:
    """GRPO's objective (Shao et al. 2024, eq. 3), as a loss to minimise. Per response token t:

        rho_t = exp(log pi(o_t) - log pi_old(o_t))
        kl_t  = exp(log ref(o_t) - log pi(o_t)) - (log ref(o_t) - log pi(o_t)) - 1     (``k3_kl``, eq. 4)
        l_t   = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * kl_t

    aggregated over the masked tokens as

        "sequence": mean over completions of each completion's mean l_t   (the paper; TRL's loss_type="grpo")
        "token":    mean over all tokens of the batch                     (TRL's loss_type="bnpo")

    ``logprobs`` ``(batch, T)`` the policy's (with gradient), ``old_logprobs`` the sampling policy's and
    ``ref_logprobs`` the reference's (constants, detached), ``advantages`` ``(batch,)`` (``group_advantages``).
    This is TRL 1.16's ``GRPOTrainer._compute_loss`` with ``importance_sampling_level="token"``, equal
    ``epsilon`` and ``epsilon_high``, no ``delta``, and ``use_bias_correction_kl=False``: TRL's default
    multiplies kl_t by rho_t (DeepSeek-V3.2's correction), which the paper does not.

    Returns (loss, kl, clip_fraction), detached statistics as TRL logs them: kl the mean kl_t over the
    masked tokens; clip_fraction the share of masked tokens whose ratio is clipped where it counts
    (rho < 1 - eps with A < 0, or rho > 1 + eps with A > 0: their gradient is 0).
    """
    if aggregate not in ("sequence", "token"):
        raise ValueError(f"unknown aggregate {aggregate!r}; use 'sequence' or 'token'")
    keep = mask.bool()
    zero = torch.zeros_like(logprobs)
    log_ratio = torch.where(keep, logprobs - old_logprobs.detach(), zero)
    ratio = log_ratio.exp()
    advantages = advantages.detach().float().unsqueeze(-1)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    kl = k3_kl(logprobs, ref_logprobs.detach(), keep)
    per_token = torch.where(keep, -surrogate + beta * kl, zero)
    if aggregate == "sequence":
        loss = (per_token.sum(-1) / keep.sum(-1).clamp(min=1)).mean()
    else:
        loss = per_token.sum() / keep.sum().clamp(min=1)
    clipped = ((ratio < 1 - clip) & (advantages < 0)) | ((ratio > 1 + clip) & (advantages > 0))
    return loss, masked_mean(kl.detach(), keep), masked_mean(clipped.float(), keep)
