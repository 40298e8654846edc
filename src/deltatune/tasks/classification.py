"""Sequence classification: one text, one class label.

Multi-task classification (``data.tasks``) is the same task on namespaced labels
(``<task>/<label>``, data/multitask.py): one head, a softmax per task (the loss normalises each
example over its own task's labels only) and metrics per task.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from ..data.collate import collate_labelled
from ..data.examples import encode_classification, label_list
from ..data.multitask import prepare_tasks
from ..data.prepare import Fields, PreparedRows
from ..lazy import lazy
from ..losses import classification_loss, masked_classification_loss
from ..metrics import classification_metrics, multitask_metrics, outcome_record, same_task, task_groups
from .base import Metric, Task
from .common import evaluate_logits, forward
from .registry import register

if TYPE_CHECKING:
    from torch import nn

torch = lazy("torch")


@register
class Classification(Task):
    name = "classification"
    summary = "text -> one of several labels"
    main_metric = Metric("accuracy", maximize=True)
    head, peft_type, new_head, one_label_per_text = "sequence", "SEQ_CLS", True, True
    multitask, icl_baselines = True, True
    predicts_from_logits = keeps_outcomes = answers_held_out = True

    @property
    def input_column(self) -> str:
        return self.cfg.data.text_column

    def fields(self, columns: set) -> Fields:
        d = self.cfg.data
        return Fields([d.text_column], d.label_column, kind="classification", augmentable=True)

    def rows(self, tokenizer=None) -> PreparedRows:
        if self.cfg.data.tasks:  # several tasks, each through the pipeline, then one labelled set
            return prepare_tasks(self.cfg, self.fields, tokenizer)
        return super().rows(tokenizer)

    def label_set(self, train: list[dict], held_out: list[dict], where: str) -> list[str]:
        return label_list(train, held_out, self.cfg.data.label_column, where)

    def examples(self, rows: list[dict], tokenizer) -> list:
        return encode_classification(rows, tokenizer, self.cfg, self.labels)

    def collate(self, examples: list) -> dict:
        return collate_labelled(examples, self.pad_id)

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Cross-entropy; with multi-task labels a softmax per task."""
        if self.labels and task_groups(self.labels):
            return masked_classification_loss(logits, targets, allowed=_allowed(tuple(self.labels)))
        return classification_loss(logits, targets)

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        return self.logits_loss(forward(model, batch["inputs"], batch["targets"]), batch["targets"])

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        y_true, scores, index = [], [], []

        def keep(logits: torch.Tensor, targets: torch.Tensor, rows: list[int]) -> None:
            y_true.extend(targets.tolist())
            scores.append(logits.float().cpu())
            index.extend(rows)

        mean = evaluate_logits(model, self.batches(examples), self.logits_loss, keep)
        logits = torch.cat(scores)
        if task_groups(self.labels):  # one model, several tasks (data.tasks)
            return {"loss": mean, **multitask_metrics(y_true, logits.numpy(), self.labels)}
        y_pred = logits.argmax(-1).tolist()
        if outcomes is not None:
            correct = [float(t == p) for t, p in zip(y_true, y_pred)]
            outcomes.update(outcome_record("accuracy", "identity", index, correct, [1.0] * len(correct)))
        return {"loss": mean, **classification_metrics(y_true, y_pred, self.labels)}

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        return self.labelled(texts, class_probabilities(model, tokenizer, self.text_ids(tokenizer, texts)))

    def sample_input(self, row: dict) -> tuple[str, str]:
        return str(row[self.cfg.data.text_column]), str(row[self.cfg.data.label_column])

    def answer_text(self, prediction: dict) -> str:
        """The label with its probability, e.g. ``positive (0.83)``."""
        label = prediction["label"]
        return f"{label} ({prediction['probabilities'][label]:.2f})"

    def text_ids(self, tokenizer, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, truncated as in training."""
        return tokenizer(texts, truncation=True, max_length=self.cfg.train.max_length)["input_ids"]

    def labelled(self, texts: list[str], probs: torch.Tensor) -> list[dict]:
        """What ``predict`` prints per text: the label and every class's probability."""
        return [{"text": text, "label": self.labels[int(p.argmax())],
                 "probabilities": {name: round(float(v), 6) for name, v in zip(self.labels, p)}}
                for text, p in zip(texts, probs)]


def class_probabilities(model: nn.Module, tokenizer, ids: list[list[int]]) -> torch.Tensor:
    """``(texts, classes)`` softmax of the head for token-id lists, padded into one batch as the tokenizer
    pads (``serve`` batches several runs' texts through here, with a model that routes rows to deltas)."""
    with torch.no_grad():
        device = next(model.parameters()).device
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        return torch.softmax(logits.float(), -1).cpu()


@lru_cache(maxsize=8)
def _allowed(labels: tuple[str, ...]) -> torch.Tensor:
    """The multi-task mask (``same_task``), built once per label set, not at every training step."""
    return torch.from_numpy(same_task(list(labels)))
