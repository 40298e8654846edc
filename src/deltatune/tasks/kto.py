"""KTO (Ethayarajh et al. 2024, Kahneman-Tversky Optimization) on a causal-LM policy: unpaired rows,
each a prompt, a completion and a thumbs up (desirable) or down (undesirable); no pairs needed.

Rows come from ``data.preferences.load_thumbs``: ``{prompt, completion, label}`` rows, and dpo's pair
and ranking rows (a pair gives its chosen response as desirable and its rejected one as undesirable).
Exact repeats of a (prompt, completion, label) are dropped; held-out rows are split by prompt, as for
the preference tasks.

The objective is ``rlhf.losses.kto_loss`` on summed log-probabilities of the completion tokens (the
prompt masked as in SFT), with r = log pi(y|x) - log ref(y|x):

    desirable:    kto.desirable_weight   * (1 - sigmoid(kto.beta * (r - z0)))
    undesirable:  kto.undesirable_weight * (1 - sigmoid(kto.beta * (z0 - r)))

The reference is the base model, as for dpo: the log-probabilities under it are computed once, before
training, by the model with its delta switched off (``Method.untouched``), and stored in the examples.

The reference point z0 is the policy's KL to the reference, estimated from mismatched pairs: each row
also carries its prompt followed by another row's completion, and a batch's z0 is the mean log-ratio of
its rows' mismatched pairs, clamped at 0 and without gradient (TRL's estimate). TRL pairs each prompt
with the completion of the previous row of its batch and so needs the batches fixed in advance (it
refuses shuffling); our loop shuffles every epoch, so the other completion is fixed when the data is
prepared instead: that of the nearest earlier row with a different prompt (cyclically). Its reference
log-probability is then computed once with the rest. A training step scores the mismatched pairs under
the policy without gradient, then the rows with it.

Evaluation on held-out rows: ``loss`` (the main metric, as dpo's), ``kl`` (z0 over all held-out rows),
the mean reward ``beta * r`` of desirable and undesirable rows and their ``margin``, the mean change of
their log-probabilities from the reference, and ``accuracy``: the share of rows on their label's side
of the reference point (reward above ``beta * z0`` for desirable rows, below for undesirable ones; 0
before training, where every reward and z0 are 0).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ..assets import DATASETS, resolve_data
from ..config import Config, DataConfig, to_dict
from ..data.collate import pad
from ..data.examples import IGNORE, PreparedData, encoded, sft_example, split_and_limit
from ..data.load import FILE, ROW
from ..data.preferences import Thumb, load_thumbs
from ..data.report import fingerprint
from ..errors import DeltatuneError
from ..lazy import lazy
from ..rlhf.losses import kto_loss
from .base import Metric, Task
from .causal_lm import generate
from .common import evaluating, to_device
from .dpo import batch_logps
from .preferences import UNUSED
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")

LABELS = {True: "desirable", False: "undesirable"}
ROW_SHAPES = ("rows with prompt, completion and label (true/false, up/down or 1/0), or dpo's preference rows "
              "(prompt, chosen and rejected, or prompt, responses and ranking)")


@register
class KTO(Task):
    name = "kto"
    summary = "prompt + completion + thumbs up/down -> policy (KTO)"
    main_metric = Metric("loss", maximize=False)  # as dpo: the accuracy saturates while the objective improves
    head, peft_type, needs_reference, generates = "causal", "CAUSAL_LM", True, True

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        out = super().problems(cfg)
        for key in ("train", "eval"):
            ref = getattr(cfg.data, key)
            if ref in DATASETS or (ref and (Path(ref).expanduser() / "data_report.json").is_file()):
                out.append(f"data.{key}: task kto needs a file of {ROW_SHAPES}, not {ref!r}")
        unused = [k for k in UNUSED if getattr(cfg.data, k) != getattr(DataConfig(), k)]
        if unused:
            out.append(f"data: {', '.join(unused)} do not apply to task kto (its file is used as it is); remove them")
        return out

    # ------------------------------------------------------------------ data

    def prepare(self, tokenizer) -> PreparedData:
        return prepare_thumbs(self.cfg, lambda thumbs: self.encode(thumbs, tokenizer))

    def file_examples(self, path: str, tokenizer) -> list:
        return self.encode(load_thumbs(path, self.cfg.data.on_error), tokenizer)

    def encode(self, thumbs: list[Thumb], tokenizer) -> list[dict]:
        """Each row's completion and its mismatched pair (``mismatched_partners``), each an SFT example."""
        d, max_len = self.cfg.data, self.cfg.train.max_length
        kept = [(t, sft_example(tokenizer, t.prompt, t.completion, d.chat_template, max_len)) for t in thumbs]
        kept = [(t, e) for t, e in kept if e is not None]
        if len(kept) < len(thumbs):
            print(f"note: {len(thumbs) - len(kept)} row(s) had no completion tokens left after truncating to "
                  f"train.max_length={max_len} and were skipped", file=sys.stderr)
        partners = mismatched_partners([t.prompt for t, _ in kept])
        return [{"completion": e, "desirable": t.desirable,
                 "mismatched": sft_example(tokenizer, t.prompt, kept[j][0].completion, d.chat_template, max_len)}
                for (t, e), j in zip(kept, partners)]  # the same prompt, so the other completion keeps tokens too

    def length(self, example) -> int:
        return len(example["completion"]["input_ids"]) + len(example["mismatched"]["input_ids"])

    def collate(self, examples: list) -> dict:
        """``inputs``: the completions; ``kl_inputs``: the mismatched pairs, row for row; ``targets["reference"]``
        ``(rows, 2)``: the reference log-probabilities of both (once computed)."""
        batch: dict = {"targets": {"desirable": torch.tensor([e["desirable"] for e in examples])}, "tokens": 0}
        for key, prefix in (("completion", ""), ("mismatched", "kl_")):
            ids, mask = pad([e[key]["input_ids"] for e in examples], self.pad_id)
            batch[f"{prefix}inputs"] = {"input_ids": ids, "attention_mask": mask}
            batch["targets"][f"{prefix}labels"] = pad([e[key]["labels"] for e in examples], IGNORE)[0]
            batch["tokens"] += int(mask.sum())
        if "reference" in examples[0]:
            batch["targets"]["reference"] = torch.tensor([e["reference"] for e in examples], dtype=torch.float32)
        return batch

    # ------------------------------------------------------------------ loss and evaluation

    def loss(self, model: nn.Module, batch: dict) -> tuple[Tensor, int]:
        """(KTO loss summed over the batch's rows, number of rows)."""
        targets = batch["targets"]
        if "reference" not in targets:
            raise DeltatuneError("kto: the examples have no reference log-probabilities; compute them first with "
                                 "Task.with_reference (train.run.build_job does)")
        with torch.no_grad():  # z0 takes no gradient: score the mismatched pairs without building a graph
            kl_logps = batch_logps(model, batch["kl_inputs"], targets["kl_labels"], self.chunked, False)
        logps = batch_logps(model, batch["inputs"], targets["labels"], self.chunked, False)
        ref, k = targets["reference"], self.cfg.kto
        loss, _, _ = kto_loss(logps, ref[:, 0], targets["desirable"], kl_logps, ref[:, 1], k.beta,
                              k.desirable_weight, k.undesirable_weight)
        return loss * logps.shape[0], logps.shape[0]

    def row_logps(self, model: nn.Module, examples: list) -> Tensor:
        """``(rows, 2)``: the model's log-probability of each row's completion and of its mismatched pair."""
        out = torch.empty(len(examples), 2)
        with evaluating(model) as device:
            for batch, index in self.batches(examples):
                batch = to_device(batch, device)
                for column, prefix in enumerate(("", "kl_")):
                    logps = batch_logps(model, batch[f"{prefix}inputs"], batch["targets"][f"{prefix}labels"],
                                        self.chunked, False)
                    out[index, column] = logps.float().cpu()
        return out

    def with_reference(self, reference: nn.Module, examples: list) -> list:
        """The examples with ``reference``: (completion, mismatched pair) log-probabilities under the base model."""
        if not examples:
            return examples
        logps = self.row_logps(reference, examples)
        return [{**e, "reference": (c, m)} for e, (c, m) in zip(examples, logps.tolist())]

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        policy = self.row_logps(model, examples)
        ref = torch.tensor([e["reference"] for e in examples], dtype=torch.float32)
        desirable = torch.tensor([e["desirable"] for e in examples])
        k = self.cfg.kto
        loss, rewards, z0 = kto_loss(policy[:, 0], ref[:, 0], desirable, policy[:, 1], ref[:, 1], k.beta,
                                     k.desirable_weight, k.undesirable_weight)
        side = rewards - k.beta * z0  # the argument of the value function's sigmoid, signed for desirable rows
        out = {"loss": float(loss), "kl": float(z0),
               "accuracy": float(torch.where(desirable, side > 0, side < 0).float().mean()), "rows": len(examples)}
        change = policy[:, 0] - ref[:, 0]
        for label, rows in ((True, desirable), (False, ~desirable)):
            out[f"{LABELS[label]}_rows"] = int(rows.sum())
            if rows.any():  # a file of one kind has no figures for the other (no NaN in metrics.json)
                out[f"{LABELS[label]}_reward"] = float(rewards[rows].mean())
                out[f"{LABELS[label]}_logp_change"] = float(change[rows].mean())
        if "desirable_reward" in out and "undesirable_reward" in out:
            out["margin"] = out["desirable_reward"] - out["undesirable_reward"]
        return out

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        return generate(model, tokenizer, texts, self.cfg.data.chat_template, max_new_tokens)


def mismatched_partners(prompts: list[str]) -> list[int]:
    """For each row, the row whose completion follows its prompt in its mismatched pair: the nearest earlier
    row with a different prompt, counting on from the end for the first rows (the previous row when every
    row has the same prompt). Linear time: a row whose predecessor shares its prompt shares its partner."""
    n = len(prompts)
    start = next((i for i in range(n) if prompts[i] != prompts[i - 1]), None)
    if start is None:
        return [(i - 1) % n for i in range(n)]
    out = [0] * n
    for step in range(n):
        i = (start + step) % n
        before = (i - 1) % n
        out[i] = before if prompts[before] != prompts[i] else out[before]
    return out


# ----------------------------------------------------------------------------- the data

def prepare_thumbs(cfg: Config, encode) -> PreparedData:
    """Thumbs files -> exact repeats dropped -> split by prompt -> limits -> examples (``encode``), with a report."""
    d = cfg.data
    files = {s: str(resolve_data(ref)) for s, ref in (("train", d.train), ("eval", d.eval)) if ref}
    rejects: list[dict] = []
    loaded = {s: load_thumbs(path, d.on_error, rejects) for s, path in files.items()}
    read = sum(len(v) for v in loaded.values())
    loaded = {s: _first_of_each(v) for s, v in loaded.items()}
    repeats = read - sum(len(v) for v in loaded.values())
    splits, limited = split_and_limit(loaded, files["train"], cfg, "rows")
    rows = {name: [{"prompt": t.prompt, "completion": t.completion, "label": LABELS[t.desirable],
                    FILE: t.source[0], ROW: t.source[1]} for t in thumbs] for name, thumbs in splits.items()}
    report = _report(cfg, files, rows, rejects, repeats, limited)
    _note_balance(cfg, splits["train"])
    return encoded(cfg, encode, splits, rows, report, rejects, "thumbs", f"{files['train']}: no usable kto")


def _first_of_each(thumbs: list[Thumb]) -> list[Thumb]:
    """The rows in file order without repeats of a (prompt, completion, label): a repeat says nothing new, it
    would only weigh that row more (a pair file often repeats a chosen response against several others)."""
    seen: set = set()
    out = []
    for t in thumbs:
        if (t.prompt, t.completion, t.desirable) not in seen:
            seen.add((t.prompt, t.completion, t.desirable))
            out.append(t)
    return out


def _report(cfg: Config, files: dict, rows: dict, rejects: list[dict], repeats: int, limited: int) -> dict:
    """The data report's figures that apply to thumbs files (the cleaning steps do not run)."""
    train_prompts = {r["prompt"] for r in rows["train"]}
    shared = sum(r["prompt"] in train_prompts for r in rows["eval"])
    labels = {}
    for r in rows["train"]:
        labels.setdefault((r["prompt"], r["completion"]), set()).add(r["label"])
    conflicting = sum(len(found) > 1 for found in labels.values())
    if conflicting:
        print(f"note: {files['train']}: {conflicting} training completion(s) are labelled both desirable and "
              "undesirable for the same prompt; both rows are kept, and pull the model opposite ways",
              file=sys.stderr)
    return {
        "task": cfg.task, "mode": "thumbs", "files": files, "columns": ["prompt", "completion", "label"],
        "rows_in": sum(len(r) for r in rows.values()) + len(rejects) + repeats + limited,
        "rows_out": sum(len(r) for r in rows.values()),
        "rows_per_split": {s: len(r) for s, r in rows.items()},
        "rejected_rows": len(rejects), "missing_handled": {}, "length_filtered": 0,
        "exact_duplicates_removed": repeats, "near_duplicates_removed": 0, "conflicting_labels": conflicting,
        "leakage_found": {"eval": {"prompt_in_train": shared}} if shared else {}, "leakage_removed": 0,
        "pii_redacted": {}, "augmented_rows": 0, "augmented_by_kind": {}, "left_out_by_limits": limited,
        "label_counts": {s: dict(sorted(Counter(x["label"] for x in r).items())) for s, r in rows.items()},
        "token_lengths": {},
        "fingerprint": fingerprint(rows, ["prompt", "completion", "label"]),
        "settings": to_dict(cfg)["data"],
    }


def _note_balance(cfg: Config, train: list[Thumb]) -> None:
    """TRL's advice from the paper's eq. 8: desirable_weight * n_D / (undesirable_weight * n_U) in [1, 4/3]."""
    k, n_d = cfg.kto, sum(t.desirable for t in train)
    n_u = len(train) - n_d
    if not n_d or not n_u:
        print(f"note: every training row is {LABELS[bool(n_d)]}; KTO moves those completions against the reference "
              "point only, with no rows of the other kind to push away from", file=sys.stderr)
        return
    ratio = k.desirable_weight * n_d / (k.undesirable_weight * n_u)
    if not 1 <= ratio <= 4 / 3:
        d_low = n_u * k.undesirable_weight / n_d
        u_high = n_d * k.desirable_weight / n_u
        print(f"note: {n_d} desirable and {n_u} undesirable training rows: desirable_weight * n_desirable / "
              f"(undesirable_weight * n_undesirable) = {ratio:.2f}, outside [1, 4/3] that the KTO paper recommends "
              f"(eq. 8); e.g. kto.desirable_weight in [{d_low:.2f}, {d_low * 4 / 3:.2f}] or kto.undesirable_weight in "
              f"[{u_high * 3 / 4:.2f}, {u_high:.2f}]", file=sys.stderr)
