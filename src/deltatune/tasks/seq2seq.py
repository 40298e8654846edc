"""Sequence to sequence on an encoder-decoder: source text -> target text (loss on the target)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.examples import encode_seq2seq
from ..data.prepare import Fields
from ..lazy import lazy
from ..losses import token_loss
from .causal_lm import LanguageModelling
from .common import forward
from .registry import register

if TYPE_CHECKING:
    from torch import nn

torch = lazy("torch")


@register
class Seq2Seq(LanguageModelling):
    name = "seq2seq"
    summary = "source -> target text on an encoder-decoder"
    head, peft_type = "seq2seq", "SEQ_2_SEQ_LM"

    def fields(self, columns: set) -> Fields:
        d = self.cfg.data
        return Fields([d.prompt_column, d.response_column], kind="seq2seq")

    def examples(self, rows: list[dict], tokenizer) -> list:
        return encode_seq2seq(rows, tokenizer, self.cfg)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        logits = forward(model, batch["inputs"], batch["targets"], encoder_decoder=True)
        return token_loss(logits, batch["targets"])

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        """The decoder's greedy output for each source text."""
        with torch.no_grad():
            device = next(model.parameters()).device
            out = []
            for source in texts:
                ids = tokenizer(source, truncation=True, max_length=self.cfg.train.max_length,
                                return_tensors="pt")["input_ids"].to(device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens)
                out.append({"prompt": source, "response": tokenizer.decode(gen[0], skip_special_tokens=True).strip(),
                            "new_tokens": int((gen[0] != tokenizer.pad_token_id).sum())})
            return out

