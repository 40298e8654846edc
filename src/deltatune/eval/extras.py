"""Evaluations beside the task metric: the forgetting meter and the prompting baselines.

Both are set up before training (when the model is still the base) and reported in
metrics.json next to the tuned model's figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..config import Config
from ..models import load_model
from ..tasks.base import Task
from .forgetting import forgetting, general_texts, text_examples
from .icl import icl_baseline


@dataclass
class Extras:
    task: Task | None = None                            # scores the general text (a language-modelling task)
    general: list[dict] = field(default_factory=list)  # general-text examples for the forgetting meter
    before: dict | None = None                          # their loss/perplexity under the base model

    def measure_before(self, base: nn.Module) -> None:
        if self.general:
            self.before = self.task.evaluate(base, self.general)

    def report(self, tuned: nn.Module) -> dict:
        if not self.general or self.before is None:
            return {}
        after = self.task.evaluate(tuned, self.general)
        return {"forgetting": {**forgetting(self.before, after), "rows": len(self.general),
                               "source": "oanc-pos sentences", "measured_on": "the final weights"}}


def build_extras(cfg: Config, task: Task, tokenizer) -> Extras:
    """The forgetting meter, for tasks that measure it (``Task.measures_forgetting``)."""
    if not task.measures_forgetting or not cfg.eval.forgetting:
        return Extras()
    texts = general_texts(rows=cfg.eval.forgetting_rows)
    return Extras(task, text_examples(texts, tokenizer, cfg.train.max_length))


def is_decoder(model_path: Path) -> bool:
    """A base whose config names a causal-LM architecture (MiniLM's names only BertModel)."""
    config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    return any(a.endswith("ForCausalLM") for a in config.get("architectures") or [])


def prompting_baselines(cfg: Config, model_path: Path, tokenizer, train_rows: list[dict],
                        eval_rows: list[dict], labels: list[str]) -> dict:
    """Zero/k-shot in-context classification by the base decoder on (up to icl_limit) eval rows."""
    if not cfg.eval.icl_shots:
        return {}
    if not is_decoder(model_path):
        return {"prompting": {"skipped": "the base model is not a decoder; in-context baselines need one"}}
    lm = load_model(model_path, "causal", None, tokenizer.pad_token_id)
    rows = eval_rows[: cfg.eval.icl_limit]
    d = cfg.data
    results = [icl_baseline(lm, tokenizer, train_rows, rows, d.text_column, d.label_column, labels, k,
                            cfg.train.seed, cfg.train.eval_batch_size) for k in cfg.eval.icl_shots]
    return {"prompting": {"rows": len(rows), "results": results}}
