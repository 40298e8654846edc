"""The model feature extraction trains (the method: feature_extraction.py): a frozen encoder, its
states pooled into one vector per text, and a linear head."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch
from torch import nn


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
