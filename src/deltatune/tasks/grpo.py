"""GRPO: a causal-LM policy steered toward a reward by comparing the completions it samples for one prompt.

Like PPO its data are prompts only (the completions are sampled) and it trains in a loop of its own
(``loop = "groups"``: train/grpo.py), which reuses the run set-up and recording of every run; unlike PPO
it has no value model: each completion's advantage is its reward against its group's.
"""

from __future__ import annotations

from ..config import Config
from ..data.prepare import Fields
from .base import Metric, Task
from .causal_lm import generate
from .registry import register


@register
class GRPO(Task):
    name = "grpo"
    summary = "prompts -> groups of sampled completions -> group-relative reward (GRPO)"
    main_metric = Metric("reward", maximize=True)
    head, peft_type, loop, generates = "causal", "CAUSAL_LM", "groups", True

    @classmethod
    def accepts(cls, method) -> str | None:
        if not method.switchable_off:
            return ("GRPO's reference model is the policy with its delta switched off, and this method's "
                    "delta cannot be switched off; use lora, qlora or ia3")
        if method.prepends_virtual_tokens:
            return "virtual tokens shift every position the completions are scored at; use lora, qlora or ia3"
        return None

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        return super().problems(cfg) + cfg.grpo.problems()

    def fields(self, columns: set) -> Fields:
        return Fields([self.cfg.data.prompt_column], kind="prompts")

    def predict(self, model, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        return generate(model, tokenizer, texts, self.cfg.data.chat_template, max_new_tokens)
