"""Alignment: reward models, DPO and PPO. The losses they share live in ``rlhf.losses`` as pure
functions of tensors."""
