"""Causal-LM supervised fine-tuning: prompt/response pairs (loss on the response) or plain text.

With ``train.chunked_loss`` the cross-entropy comes from the final hidden states through
``losses.chunked_causal_lm_loss``, so the logits of the whole batch never exist; models it does
not fit (soft prompts, see ``common.decoder_parts``) take the plain path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.collate import collate
from ..data.examples import PreparedData, encode_sft, encode_text, prompt_ids
from ..data.pack import pack
from ..data.prepare import Fields
from ..errors import RunError
from ..lazy import lazy
from ..losses import causal_lm_loss, chunked_causal_lm_loss
from ..metrics import outcome_record, perplexity
from .base import Metric, Task
from .common import decoder_parts, evaluating, forward, to_device
from .registry import register

if TYPE_CHECKING:
    from torch import nn

torch = lazy("torch")


class LanguageModelling(Task):
    """What the generative tasks share: a token-level loss, evaluated as loss and perplexity."""
    main_metric = Metric("perplexity", maximize=False)
    answers_held_out = True  # prompt -> response (plain-text causal-LM rows are refused by ``sample_input``)

    def collate(self, examples: list) -> dict:
        return collate(examples, self.pad_id)

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        total, count, index, losses, tokens = 0.0, 0, [], [], []
        with evaluating(model) as device:
            for batch, rows in self.batches(examples):
                batch = to_device(batch, device)
                per_row = self.row_losses(model, batch) if outcomes is not None else None
                if per_row is None:
                    loss, n = self.loss(model, batch)
                else:
                    index += rows
                    losses += [float(v) for v, _ in per_row]
                    tokens += [n for _, n in per_row]
                    loss, n = sum(float(v) for v, _ in per_row), sum(n for _, n in per_row)
                total, count = total + float(loss), count + n
        mean = total / max(count, 1)
        if index:
            outcomes.update(outcome_record("perplexity", "exp", index, losses, tokens))
        return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}

    def row_losses(self, model: nn.Module, batch: dict) -> list[tuple[torch.Tensor, int]] | None:
        """``loss`` per row of the batch (for per-example outcomes), from one forward; None if not kept."""
        return None

    def sample_input(self, row: dict) -> tuple[str, str]:
        d = self.cfg.data
        if d.prompt_column not in row:  # plain text: no prompt to answer, and predict frames its text as one
            raise RunError(f"a {self.name} run on plain text ({d.text_column}) has no prompt/response pairs to "
                           "compare answers on; held-out answers need data with "
                           f"{d.prompt_column}/{d.response_column} columns")
        return str(row[d.prompt_column]), str(row.get(d.response_column, ""))


def causal_loss(model: nn.Module, batch: dict, chunked: bool, per_row: bool = False):
    """(summed next-token loss over the labelled tokens, their number); with ``per_row`` a list of those
    pairs, one per row of the batch, from the same forward."""
    targets = batch["targets"]
    parts = decoder_parts(model) if chunked else None
    if parts is None:
        out, loss = forward(model, batch["inputs"], targets), causal_lm_loss
    else:
        body, head = parts
        out = body(**batch["inputs"], use_cache=False).last_hidden_state
        loss = lambda hidden, labels: chunked_causal_lm_loss(hidden, head, labels)  # noqa: E731
    if per_row:
        return [loss(out[i:i + 1], targets[i:i + 1]) for i in range(len(targets))]
    return loss(out, targets)


def generate(model: nn.Module, tokenizer, prompts: list[str], chat_template: bool,
             max_new_tokens: int = 64) -> list[dict]:
    """Greedy responses, each prompt framed as in training."""
    with torch.no_grad():
        device = next(model.parameters()).device
        out = []
        for prompt in prompts:  # one at a time: no padding side effects on short CPU runs
            ids = torch.tensor([prompt_ids(tokenizer, prompt, chat_template)], device=device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            new = gen[0, ids.shape[1]:]
            out.append({"prompt": prompt, "response": tokenizer.decode(new, skip_special_tokens=True).strip(),
                        "new_tokens": len(new)})
        return out


@register
class CausalLM(LanguageModelling):
    name = "causal_lm"
    summary = "prompt -> response (or plain text), next-token loss"
    head, peft_type = "causal", "CAUSAL_LM"
    keeps_outcomes = True
    packs, measures_forgetting, generates = True, True, True

    def fields(self, columns: set) -> Fields:
        """SFT when the file has prompt/response columns, else plain-text continuation."""
        d = self.cfg.data
        if d.prompt_column in columns or d.response_column in columns:
            return Fields([d.prompt_column, d.response_column], kind="sft")
        return Fields([d.text_column], kind="text", augmentable=True)

    def examples(self, rows: list[dict], tokenizer) -> list:
        if rows and self.cfg.data.prompt_column in rows[0]:
            return encode_sft(rows, tokenizer, self.cfg)
        return encode_text(rows, tokenizer, self.cfg)

    def prepare(self, tokenizer) -> PreparedData:
        data = super().prepare(tokenizer)
        if self.cfg.data.pack:
            data.train.examples = pack(data.train.examples, self.cfg.train.max_length)
        return data

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        return causal_loss(model, batch, self.chunked)

    def row_losses(self, model: nn.Module, batch: dict) -> list[tuple[torch.Tensor, int]]:
        return causal_loss(model, batch, self.chunked, per_row=True)

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        return generate(model, tokenizer, texts, self.cfg.data.chat_template, max_new_tokens)
