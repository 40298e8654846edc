"""PPO's policy, and rollouts: prompts in, sampled responses out, with every token scored.

The policy is the causal LM with its delta (a peft model) plus a value head. The reference
model PPO's KL penalty needs is the *same* model with the delta switched off
(``peft_model.disable_adapter()``), so the base weights exist once in memory.

Shapes: ``query`` (batch, P) left-padded prompts; ``response`` (batch, T) sampled tokens;
per-token quantities (batch, T) aligned with ``response``: entry t belongs to response token t
and is computed from the hidden state that predicts it (the position before it).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import GenerationConfig

from ..data import prompt_text


@dataclass
class Policy:
    model: PeftModel
    value_head: nn.Linear | None  # final hidden state -> value; zero-initialised (Ziegler et al. 2019); GRPO: None
    tokenizer: Any

    @classmethod
    def wrap(cls, model: PeftModel, tokenizer) -> "Policy":
        head = nn.Linear(model.get_base_model().config.hidden_size, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(model, head.to(next(model.parameters()).device), tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reference(self):
        """Context manager: inside it, the model computes what the base model computes."""
        return self.model.disable_adapter()

    def forward(self, input_ids: Tensor, attention_mask: Tensor, n_response: int, temperature: float,
                values: bool = True) -> tuple[Tensor, Tensor | None]:
        """Temperature-scaled logits (batch, T, vocab) and values (batch, T) for the last
        ``n_response`` tokens. Only those positions go through the output layer."""
        base = self.model.get_base_model()
        backbone, lm_head = getattr(base, base.base_model_prefix), base.get_output_embeddings()
        # left padding: positions count real tokens, as generate() counts them
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state[:, -n_response - 1:-1]
        logits = lm_head(hidden).float() / temperature
        return logits, (self.value_head(hidden).squeeze(-1).float() if values else None)


def prompt_ids(tokenizer, prompt: str, chat_template: bool) -> list[int]:
    """The tokens a response continues: the chat-template frame when ``chat_template`` is on and
    the tokenizer has one; otherwise the prompt as written (after BOS), so the response continues it."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt_text(tokenizer, prompt, True), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool, max_length: int) -> tuple[Tensor, Tensor]:
    """Left-padded ``(ids, mask)``; a prompt longer than ``max_length`` keeps its last tokens."""
    rows = [prompt_ids(tokenizer, p, chat_template)[-max_length:] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, -len(row):] = torch.tensor(row)
            mask[i, -len(row):] = 1
    return ids, mask


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({i for i in [tokenizer.eos_token_id, *configured] if i is not None})


def response_mask(response: Tensor, eos: list[int]) -> Tensor:
    """1 on each response's tokens up to and including its first EOS, 0 after (padding)."""
    is_eos = torch.isin(response, torch.tensor(eos, device=response.device)).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[token] per position: (batch, T)."""
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@dataclass
class Rollout:
    prompts: list[str]
    responses: list[str]  # decoded, special tokens removed
    query: Tensor
    query_mask: Tensor
    response: Tensor
    mask: Tensor
    logprobs: Tensor | None = None      # the sampling policy's, no gradient
    ref_logprobs: Tensor | None = None  # the reference's (delta off)
    values: Tensor | None = None
    scores: Tensor | None = None        # the reward, before the KL penalty

    def __len__(self) -> int:
        return len(self.prompts)

    def inputs(self) -> tuple[Tensor, Tensor]:
        return torch.cat([self.query, self.response], 1), torch.cat([self.query_mask, self.mask], 1)

    def select(self, index: Tensor) -> "Rollout":
        """The rollouts at ``index`` (a minibatch)."""
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value[index] if value is not None else None
        return Rollout(**picked)

    def kl(self) -> Tensor:
        """Each response's KL to the reference, summed over its tokens (the usual sample estimate)."""
        return ((self.logprobs - self.ref_logprobs) * self.mask).sum(-1)


@torch.no_grad()
def sample(policy: Policy, prompts: list[str], p, chat_template: bool, max_length: int) -> Rollout:
    """Sample one response per prompt (``p`` is the PpoConfig: temperature, top_k, max_new_tokens)."""
    tok = policy.tokenizer
    query, query_mask = encode_prompts(tok, prompts, chat_template, max_length)
    query, query_mask = query.to(policy.device), query_mask.to(policy.device)
    eos = eos_ids(policy.model, tok)
    settings = GenerationConfig(do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=1.0,
                                max_new_tokens=p.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos,
                                bos_token_id=tok.bos_token_id)
    out = policy.model.generate(input_ids=query, attention_mask=query_mask, generation_config=settings)
    response = out[:, query.shape[1]:]
    mask = response_mask(response, eos)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, mask)]
    return Rollout(prompts, texts, query, query_mask, response, mask)


@torch.no_grad()
def score_tokens(policy: Policy, rollout: Rollout, temperature: float, chunk: int) -> None:
    """Fill in the policy's and the reference's log-probs and, if the policy has a value head (PPO's; GRPO's
    has none), the values, ``chunk`` rollouts at a time."""
    logprobs, ref_logprobs, values = [], [], []
    has_values = policy.value_head is not None
    for start in range(0, len(rollout), chunk):
        part = rollout.select(torch.arange(start, min(start + chunk, len(rollout))))
        ids, attention = part.inputs()
        n = part.response.shape[1]
        logits, v = policy.forward(ids, attention, n, temperature, values=has_values)
        logprobs.append(token_logprobs(logits, part.response))
        values.append(v)
        with policy.reference():
            ref_logits, _ = policy.forward(ids, attention, n, temperature, values=False)
        ref_logprobs.append(token_logprobs(ref_logits, part.response))
    rollout.logprobs, rollout.ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
    rollout.values = torch.cat(values) if has_values else None
