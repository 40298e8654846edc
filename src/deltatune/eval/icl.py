"""Prompting baselines: zero-shot and k-shot in-context classification with the base decoder.

Each evaluation text is framed as ``Text: ...\\nLabel:`` (after k demonstrations drawn from the
training rows, balanced over the labels, the same for every example), and each label word is
scored by the log-likelihood the model gives it as the continuation:

    score(y | x) = sum_t log p(w_t | prompt(x), w_<t)     for the tokens w of " " + y

The prediction is the best-scoring label. Nothing is trained, so the numbers show what
fine-tuning buys over asking the model.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from ..metrics import classification_metrics

TEMPLATE = "Text: {text}\nLabel:"


def demonstrations(rows: list[dict], text: str, label: str, shots: int, seed: int) -> str:
    """``shots`` solved examples, cycling through the labels so each appears about equally."""
    if shots == 0:
        return ""
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row[label], []).append(row)
    pools = {k: rng.sample(v, len(v)) for k, v in sorted(by_label.items())}
    picked, names = [], list(pools)
    for i in range(shots):
        pool = pools[names[i % len(names)]]
        if pool:
            picked.append(pool.pop())
    rng.shuffle(picked)
    return "".join(TEMPLATE.format(text=r[text]) + f" {r[label]}\n\n" for r in picked)


@torch.no_grad()
def label_scores(model: nn.Module, tokenizer, prompts: list[str], labels: list[str], batch_size: int = 8,
                 max_length: int = 1024) -> torch.Tensor:
    """(n_prompts, n_labels) summed log-probabilities of each label word after each prompt."""
    device = next(model.parameters()).device
    label_ids = [tokenizer(" " + y, add_special_tokens=False)["input_ids"] for y in labels]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pairs = []  # (prompt index, label index, ids, number of label tokens)
    for i, prompt in enumerate(prompts):
        head = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for j, tail in enumerate(label_ids):
            ids = (head + tail)[-max_length:]  # keep the end: the question and the label word
            pairs.append((i, j, ids, len(tail)))
    scores = torch.zeros(len(prompts), len(labels))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(p[2]) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, _, seq, _) in enumerate(chunk):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for row, (i, j, seq, n) in enumerate(chunk):
            positions = torch.arange(len(seq) - n - 1, len(seq) - 1)  # position t predicts token t + 1
            targets = torch.tensor(seq[len(seq) - n:])
            scores[i, j] = logprobs[row, positions, targets].sum().cpu()
    model.train(was_training)
    return scores


def icl_baseline(model: nn.Module, tokenizer, train_rows: list[dict], eval_rows: list[dict], text: str,
                 label: str, labels: list[str], shots: int, seed: int, batch_size: int = 8) -> dict:
    """Accuracy, macro-F1, per-class figures and confusion matrix of k-shot prompting."""
    prefix = demonstrations(train_rows, text, label, shots, seed)
    prompts = [prefix + TEMPLATE.format(text=r[text]) for r in eval_rows]
    predicted = label_scores(model, tokenizer, prompts, labels, batch_size).argmax(-1).tolist()
    index = {name: k for k, name in enumerate(labels)}
    return {"shots": shots, **classification_metrics([index[r[label]] for r in eval_rows], predicted, labels)}
