"""Feature extraction (the feature-based approach of Devlin et al., 2019): a frozen encoder, a trained head.

Each text is encoded once: ``h = mean_t(H_t)`` over the last hidden states of its real tokens
(or ``H_[CLS]``). The vectors are cached on disk per example, keyed by the model and the token
ids, so the next run, another split or another task on the same texts skips the encoder. Only the classifier
``softmax(W h + b)`` trains, on the cached vectors: epochs cost almost nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import doc
from ..fs import cache_dir
from .base import Method, set_trainable
from .registry import register


@dataclass
class FeatureOptions:
    pooling: str = doc("mean", "How a text becomes one vector: mean (of token states) or cls (first token).")

    def problems(self) -> list[str]:
        return [] if self.pooling in ("mean", "cls") else [f"pooling: use mean or cls, got {self.pooling!r}"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """One vector per text from ``(texts, tokens, hidden)`` states: the mean over its real tokens
    (``attention_mask``), or the first token's (``cls``)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class FeatureClassifier(nn.Module):
    """Frozen backbone + linear head; reads precomputed ``features`` when the batch has them."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str, config):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.config = config
        self.head = nn.Linear(config.hidden_size, num_labels)
        self._cache_key: str | None = None

    @property
    def cache_key(self) -> str:
        """Identifies the features: the frozen backbone's weights and the pooling (hashed once)."""
        if self._cache_key is None:
            h = hashlib.sha256(self.pooling.encode())
            for name, param in self.backbone.state_dict().items():
                h.update(name.encode())
                h.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._cache_key = h.hexdigest()[:16]
        return self._cache_key

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids=None, attention_mask=None, features=None, **_):
        if features is None:
            features = self.encode(input_ids, attention_mask)
        return SimpleNamespace(logits=self.head(features))


@register
class FeatureExtraction(Method):
    name = "feature_extraction"
    can_merge = False
    traceable = True  # the frozen encoder, the pooling and the head form one plain module
    caches_features = True
    summary = "frozen encoder, cached features, trained classifier"
    Options = FeatureOptions

    def accepts(self, task) -> str | None:
        if not task.one_label_per_text:
            return ("feature extraction trains a classifier on one pooled vector per text, and this task's "
                    "examples are not one text with one label; use lora or full")
        return None

    def apply(self, model: nn.Module, options: FeatureOptions, task) -> nn.Module:
        wrapped = FeatureClassifier(model.base_model, model.config.num_labels, options.pooling, model.config)
        set_trainable(wrapped, lambda name: name.startswith("head."))
        return wrapped

    def merge(self, model: nn.Module) -> nn.Module:
        from ..errors import CannotMerge

        raise CannotMerge("feature_extraction: the head reads pooled features that the base model's own "
                          "head does not compute; ship the run directory (base + delta) instead")

    def prepare_examples(self, model: FeatureClassifier, examples: list[dict]) -> list[dict]:
        features = cached_features(model, [e["input_ids"] for e in examples])
        return [{"features": f, "label": e["label"], "input_ids": e["input_ids"]}
                for f, e in zip(features, examples)]


def cached_features(model: FeatureClassifier, ids: list[list[int]]) -> torch.Tensor:
    """Pooled vectors for token-id lists; each example is encoded once per model, ever.

    The cache holds shards per model; each shard maps example keys (a hash of the token ids)
    to rows, so any later run (another split, another task on the same texts) reuses them.
    """
    folder = cache_dir() / "features" / model.cache_key
    known = _read_shards(folder)
    keys = [hashlib.sha1(json.dumps(x).encode()).hexdigest() for x in ids]
    missing = list(dict.fromkeys(k for k in keys if k not in known))
    if missing:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        vectors = _encode_all(model, [ids[first[k]] for k in missing])
        folder.mkdir(parents=True, exist_ok=True)
        shard = folder / f"{hashlib.sha1(''.join(missing).encode()).hexdigest()[:16]}.safetensors"
        tmp = shard.with_suffix(".tmp")
        save_file({"features": vectors.contiguous()}, tmp, metadata={"keys": json.dumps(missing)})
        tmp.replace(shard)
        known.update(zip(missing, vectors))
    return torch.stack([known[k] for k in keys])


def _read_shards(folder: Path) -> dict[str, torch.Tensor]:
    known: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            keys = json.loads(fh.metadata()["keys"])
            known.update(zip(keys, fh.get_tensor("features")))
    return known


def _encode_all(model: FeatureClassifier, ids: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    pad = model.config.pad_token_id or 0
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths: less padding
    out = torch.empty(len(ids), model.config.hidden_size)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        out[chunk] = model.encode(input_ids.to(device), mask.to(device)).float().cpu()
    return out
