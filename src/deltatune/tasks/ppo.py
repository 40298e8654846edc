"""PPO: a causal-LM policy steered toward a reward with sampled rollouts (its own loop)."""

from __future__ import annotations

from .base import Metric, Task
from .registry import register


@register
class PPO(Task):
    name = "ppo"
    summary = "prompts -> sampled responses -> reward (PPO)"
    main_metric = Metric("reward", maximize=True)
    head, peft_type, loop = "causal", "CAUSAL_LM", "rollouts"

    @classmethod
    def accepts(cls, method) -> str | None:
        if not method.switchable_off:
            return ("PPO's reference model is the policy with its delta switched off, and this method's "
                    "delta cannot be switched off; use lora, qlora or ia3")
        if method.prepends_virtual_tokens:
            return "virtual tokens shift every position the rollouts score; use lora, qlora or ia3"
        return None
