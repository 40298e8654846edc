"""PPO: a causal-LM policy steered toward a reward with sampled rollouts.

Its data are prompts only (the responses are sampled), and it trains in its own loop
(``loop = "rollouts"``: train/ppo.py), which reuses the run set-up and recording of every run.
"""

from __future__ import annotations

from ..config import Config
from ..data.prepare import Fields
from .base import Metric, Task
from .causal_lm import generate
from .registry import register


@register
class PPO(Task):
    name = "ppo"
    summary = "prompts -> sampled responses -> reward (PPO)"
    main_metric = Metric("reward", maximize=True)
    head, peft_type, loop, generates = "causal", "CAUSAL_LM", "rollouts", True
    reference_is_delta_off = one_learning_rate = True

    @classmethod
    def accepts(cls, method) -> str | None:
        if not method.switchable_off:
            return ("PPO's reference model is the policy with its delta switched off, and this method's "
                    "delta cannot be switched off; use lora, qlora or ia3")
        if method.prepends_virtual_tokens:
            return "virtual tokens shift every position the rollouts score; use lora, qlora or ia3"
        return None

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        return super().problems(cfg) + cfg.ppo.problems()

    def fields(self, columns: set) -> Fields:
        return Fields([self.cfg.data.prompt_column], kind="prompts")

    def predict(self, model, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        return generate(model, tokenizer, texts, self.cfg.data.chat_template, max_new_tokens)
