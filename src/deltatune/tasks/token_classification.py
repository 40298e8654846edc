"""Token classification: one tag per word (e.g. part of speech), read at each word's first sub-word token."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..data.collate import collate
from ..data.examples import encode_tagged, label_list
from ..data.prepare import Fields
from ..lazy import lazy
from ..losses import IGNORE, token_loss
from ..metrics import classification_metrics, entity_metrics, is_iob2, outcome_record
from .base import Metric, Task
from .common import evaluate_logits, forward, tagged_predictions
from .registry import register

if TYPE_CHECKING:
    from torch import nn

torch = lazy("torch")


@register
class TokenClassification(Task):
    name = "token_classification"
    summary = "words -> one tag each"
    main_metric = Metric("accuracy", maximize=True)
    head, peft_type, new_head = "token", "TOKEN_CLS", True
    predicts_from_logits = keeps_outcomes = answers_held_out = True

    @property
    def input_column(self) -> str:
        return self.cfg.data.tokens_column

    def fields(self, columns: set) -> Fields:
        d = self.cfg.data
        return Fields([d.tokens_column], d.tags_column, kind="tokens", per_word=True)

    def label_set(self, train: list[dict], held_out: list[dict], where: str) -> list[str]:
        # Tag sets are large and some tags are rare: one seen only in evaluation is still a tag the
        # head should have (it simply scores 0 recall), not a typo as an unknown class label would be.
        return label_list(train + held_out, [], self.cfg.data.tags_column, where)

    def examples(self, rows: list[dict], tokenizer) -> list:
        return encode_tagged(rows, tokenizer, self.cfg, self.labels)

    def collate(self, examples: list) -> dict:
        return collate(examples, self.pad_id)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        return token_loss(forward(model, batch["inputs"], batch["targets"]), batch["targets"])

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        """Per word: accuracy, macro-F1 over tags, per-tag precision/recall/F1, confusion matrix; with BIO
        (IOB2) tags also per entity: precision, recall, F1 (``metrics.entity_metrics``)."""
        y_true, y_pred, index, right, words = [], [], [], [], []
        sentences: list[tuple[list[str], list[str]]] = []  # BIO tags: each sentence's true and predicted tags
        bio = is_iob2(self.labels)

        def keep(logits: torch.Tensor, targets: torch.Tensor, rows: list[int]) -> None:
            true, pred = tagged_predictions(logits, targets)
            y_true.extend(true)
            y_pred.extend(pred)
            if bio:
                predicted = logits[:, -targets.shape[1]:].argmax(-1)
                for t_row, p_row in zip(targets.tolist(), predicted.tolist()):
                    pairs = [(self.labels[t], self.labels[p]) for t, p in zip(t_row, p_row) if t != IGNORE]
                    sentences.append(([t for t, _ in pairs], [p for _, p in pairs]))
            if outcomes is not None:  # per sentence: its right words and its words
                hit = (logits[:, -targets.shape[1]:].argmax(-1) == targets) & (targets != IGNORE)
                index.extend(rows)
                right.extend(hit.sum(1).float().tolist())
                words.extend((targets != IGNORE).sum(1).float().tolist())

        mean = evaluate_logits(model, self.batches(examples), token_loss, keep)
        if outcomes is not None:
            outcomes.update(outcome_record("accuracy", "identity", index, right, words))
        entity = entity_metrics(*zip(*sentences)) if sentences else {}
        return {"loss": mean, **classification_metrics(y_true, y_pred, self.labels), **entity}

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        """One tag per whitespace-separated word."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start:start + self.batch_size]
            encoded = self.word_ids(tokenizer, chunk)
            logits = token_logits(model, tokenizer, [ids for ids, _ in encoded])
            out += [self.tagged(text, words, rows) for text, (_, words), rows in zip(chunk, encoded, logits)]
        return out

    def sample_input(self, row: dict) -> tuple[str, str]:
        """The words joined by spaces (``predict`` splits them there again) and their tags."""
        d = self.cfg.data
        return " ".join(map(str, row[d.tokens_column])), " ".join(map(str, row[d.tags_column]))

    def answer_text(self, prediction: dict) -> str:
        return " ".join(prediction["tags"])

    def word_ids(self, tokenizer, texts: list[str]) -> list[tuple[list[int], list[int | None]]]:
        """Per text (split at whitespace into words): its token ids, truncated as in training, and the word
        each token belongs to (None for special tokens)."""
        enc = tokenizer([text.split() for text in texts], is_split_into_words=True, truncation=True,
                        max_length=self.cfg.train.max_length)
        return [(enc["input_ids"][i], enc.word_ids(i)) for i in range(len(texts))]

    def tagged(self, text: str, word_ids: list[int | None], logits: torch.Tensor) -> dict:
        """What ``predict`` prints for a text: its words and a tag each, read at each word's first token
        (``logits``: one row per token)."""
        first = {}
        for position, word in enumerate(word_ids):
            if word is not None and word not in first:
                first[word] = position
        tags = [self.labels[int(logits[first[w]].argmax())] for w in sorted(first)]
        return {"text": text, "tokens": text.split()[: len(tags)], "tags": tags}


def token_logits(model: nn.Module, tokenizer, ids: list[list[int]]) -> list[torch.Tensor]:
    """Each sequence's ``(tokens, tags)`` logits from one padded batch (virtual tokens a soft prompt puts
    before the text left out)."""
    with torch.no_grad():
        device = next(model.parameters()).device
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
        logits = logits[:, -enc["input_ids"].shape[1]:].float().cpu()
        return [row[mask.bool()] for row, mask in zip(logits, enc["attention_mask"])]
