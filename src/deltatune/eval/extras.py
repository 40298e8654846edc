"""Evaluations beside the task metric: the forgetting meter and the prompting baselines.

Both are set up before training (when the model is still the base) and reported in
metrics.json next to the tuned model's figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from ..config import Config
from .evaluate import evaluate
from .forgetting import forgetting, general_texts, text_examples


@dataclass
class Extras:
    general: list[dict] = field(default_factory=list)  # general-text examples for the forgetting meter
    before: dict | None = None                          # their loss/perplexity under the base model
    prompting: Callable[[], dict] | None = None         # the in-context baselines, run before training

    def measure_before(self, base: nn.Module, batch_size: int, pad_id: int, chunked: bool = True) -> None:
        if self.general:
            self.before = evaluate(base, self.general, "causal_lm", batch_size, pad_id, chunked_loss=chunked)

    def report(self, tuned: nn.Module, batch_size: int, pad_id: int, chunked: bool = True) -> dict:
        if not self.general or self.before is None:
            return {}
        after = evaluate(tuned, self.general, "causal_lm", batch_size, pad_id, chunked_loss=chunked)
        return {"forgetting": {**forgetting(self.before, after), "rows": len(self.general),
                               "source": "oanc-pos sentences", "measured_on": "the final weights"}}


def build_extras(cfg: Config, tokenizer) -> Extras:
    if cfg.task != "causal_lm" or not cfg.eval.forgetting:
        return Extras()
    texts = general_texts(rows=cfg.eval.forgetting_rows)
    return Extras(text_examples(texts, tokenizer, cfg.train.max_length))


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
    from ..models import load_model
    from .icl import icl_baseline

    lm = load_model(model_path, "causal_lm", None, tokenizer.pad_token_id)
    rows = eval_rows[: cfg.eval.icl_limit]
    d = cfg.data
    results = [icl_baseline(lm, tokenizer, train_rows, rows, d.text_column, d.label_column, labels, k,
                            cfg.train.seed, cfg.train.eval_batch_size) for k in cfg.eval.icl_shots]
    return {"prompting": {"rows": len(rows), "results": results}}
