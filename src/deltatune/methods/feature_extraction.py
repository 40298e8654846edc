"""Feature extraction (the feature-based approach of Devlin et al., 2019): a frozen encoder, a trained head.

Each text is encoded once: ``h = mean_t(H_t)`` over the last hidden states of its real tokens
(or ``H_[CLS]``). The vectors are cached on disk per example, keyed by the model and the token
ids, so the next run, another split or another task on the same texts skips the encoder. Only the classifier
``softmax(W h + b)`` learns, on the cached vectors: by default fitted to convergence (``fit_head``:
logistic regression by L-BFGS, its L2 strength cross-validated), or by the loop's AdamW steps.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import doc
from ..fs import cache_dir
from ..lazy import lazy
from .base import Method, set_trainable
from .registry import register

if TYPE_CHECKING:
    from .feature_classifier import FeatureClassifier

torch = lazy("torch")
nn = lazy("torch.nn")
safetensors = lazy("safetensors")
safetensors_torch = lazy("safetensors.torch")


@dataclass
class FeatureOptions:
    pooling: str = doc("mean", "How a text becomes one vector: mean (of token states) or cls (first token).")
    head: str = doc("lbfgs", "How the head learns: lbfgs fits it to convergence on the cached features "
                             "(logistic regression; train.lr and train.epochs do not apply), adamw trains it "
                             "by the loop's steps at train.lr.")
    l2: float | str = doc("auto", "With head=lbfgs: the L2 strength (loss + l2/2 * |W|^2), or auto: chosen by "
                                  "5-fold cross-validation on the training split.")

    def problems(self) -> list[str]:
        problems = [] if self.pooling in ("mean", "cls") else [f"pooling: use mean or cls, got {self.pooling!r}"]
        if self.head not in ("lbfgs", "adamw"):
            problems.append(f"head: use lbfgs or adamw, got {self.head!r}")
        if self.l2 != "auto" and (isinstance(self.l2, (bool, str)) or not self.l2 >= 0):
            problems.append(f"l2: use auto or a number >= 0, got {self.l2!r}")
        return problems


@register
class FeatureExtraction(Method):
    name = "feature_extraction"
    can_merge = False
    traceable = True  # the frozen encoder, the pooling and the head form one plain module
    caches_features = True
    summary = "frozen encoder, cached features, trained classifier"
    Options = FeatureOptions
    # Only with head=adamw: the default (lbfgs) fits the head directly and uses no learning rate.
    default_lr = 1e-3  # Adam's own default, the usual rate of linear probes on frozen features
    default_lr_source = ("head=adamw only (lbfgs uses no rate): Adam's default 1e-3, the usual rate of a linear "
                         "probe on frozen features (e.g. SentEval, Conneau & Kiela 2018)")

    def accepts(self, task) -> str | None:
        if not task.one_label_per_text:
            return ("feature extraction trains a classifier on one pooled vector per text, and this task's "
                    "examples are not one text with one label; use lora or full")
        return None

    def apply(self, model: nn.Module, options: FeatureOptions, task) -> nn.Module:
        from .feature_classifier import FeatureClassifier

        wrapped = FeatureClassifier(model.base_model, model.config.num_labels, options.pooling, model.config)
        set_trainable(wrapped, lambda name: name.startswith("head."))
        return wrapped

    def merge(self, model: nn.Module) -> nn.Module:
        from ..errors import CannotMerge

        raise CannotMerge("feature_extraction: the head reads pooled features that the base model's own "
                          "head does not compute; ship the run directory (base + delta) instead")

    def fit(self, model: FeatureClassifier, examples: list[dict], options: FeatureOptions, seed: int) -> dict | None:
        """head=lbfgs: the head fitted to convergence on the cached features (``fit_head``)."""
        if not self.fits_directly(options):
            return None
        features = torch.stack([e["features"] for e in examples])
        labels = torch.tensor([e["label"] for e in examples])
        weight, bias, info = fit_head(features, labels, model.head.out_features,
                                      None if options.l2 == "auto" else float(options.l2), seed=seed)
        with torch.no_grad():
            model.head.weight.copy_(weight)
            model.head.bias.copy_(bias)
        return info

    def fits_directly(self, options: FeatureOptions) -> bool:
        return options.head == "lbfgs"

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
        safetensors_torch.save_file({"features": vectors.contiguous()}, tmp, metadata={"keys": json.dumps(missing)})
        tmp.replace(shard)
        known.update(zip(missing, vectors))
    return torch.stack([known[k] for k in keys])


def _read_shards(folder: Path) -> dict[str, torch.Tensor]:
    known: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safetensors.safe_open(shard, "pt") as fh:
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


def fit_head(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float | None = None,
             folds: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The linear head ``softmax(W h + b)`` fitted to convergence: multinomial logistic regression,
    minimising ``mean cross-entropy + l2 / 2 * ||W||^2`` (the bias unpenalised, as scikit-learn's
    LogisticRegression does; its ``C`` is ``1 / (l2 * n)``) by L-BFGS in float64. The problem is convex,
    so the result depends on neither a learning rate nor a number of epochs. ``l2`` None: chosen from
    ``L2_GRID`` by stratified ``folds``-fold cross-validation on these examples (the held-out
    cross-entropy), then the head refitted on all of them. Returns (W, b, what was found)."""
    x, y = features.double(), labels.long()
    info: dict = {"examples": len(y)}
    if l2 is None:
        losses = _cross_validated(x, y, classes, folds, seed)
        l2 = min(losses, key=losses.get)
        info["cv_loss"] = {f"{k:g}": round(v, 5) for k, v in losses.items()}
    weight, bias, iterations = _lbfgs(x, y, classes, l2)
    info.update(l2=l2, iterations=iterations,
                train_loss=round(float(nn.functional.cross_entropy(x @ weight.T + bias, y)), 6))
    return weight.float(), bias.float(), info


L2_GRID = tuple(10.0 ** e for e in range(1, -7, -1))  # 10 .. 1e-6: a head near zero to almost no penalty


def _lbfgs(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, start=None, max_iter: int = 1000):
    """L-BFGS on the regularised cross-entropy from ``start`` (zeros): (W, b, iterations)."""
    weight = torch.zeros(classes, x.shape[1], dtype=x.dtype) if start is None else start[0].clone()
    bias = torch.zeros(classes, dtype=x.dtype) if start is None else start[1].clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    iterations = optimizer.state[optimizer._params[0]]["n_iter"]
    return weight.detach(), bias.detach(), iterations


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Each example's fold: every class shuffled, then dealt round-robin (so each fold holds its share)."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def _cross_validated(x, y, classes: int, folds: int, seed: int) -> dict[float, float]:
    """Held-out cross-entropy (mean over folds) per L2 strength, strongest first, each fold's fit starting
    from its previous one; the weaker strengths (slow: the weights grow) are skipped once the loss has
    risen twice in a row (it rises and falls once over the grid, as regularisation goes from too much to
    too little)."""
    fold = stratified_folds(y, min(folds, len(y)), seed)
    splits = [(fold != k, fold == k) for k in fold.unique().tolist() if (fold != k).any()]
    starts: list = [None] * len(splits)
    losses: dict[float, float] = {}
    for l2 in L2_GRID:
        total = 0.0
        for i, (train, held) in enumerate(splits):
            weight, bias, _ = _lbfgs(x[train], y[train], classes, l2, starts[i], max_iter=100)
            starts[i] = (weight, bias)
            total += float(nn.functional.cross_entropy(x[held] @ weight.T + bias, y[held]))
        losses[l2] = total / len(splits)
        last = list(losses.values())[-3:]
        if len(last) == 3 and last[0] < last[1] < last[2]:
            break
    return losses
