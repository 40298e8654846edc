"""Typed configuration: the single source of truth for a run.

A config is YAML plus dotted ``key=value`` overrides. This module parses it and checks what it can
on its own: unknown keys with a "did you mean", wrong types, and each section's values (its
``problems()``). It sits below every layer and imports none: what needs a registry (methods,
tasks) or the file system (packaged assets, data files) is checked by ``configure.load_config``,
which reports every problem of both at once. Each field's ``help`` metadata is its documentation
(`deltatune validate --explain` prints it).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError



def doc(default: Any, help: str) -> Any:
    """A dataclass field with documentation (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


MISSING_POLICIES = ("error", "drop", "fill")
# train.lr above this is refused; at or above LARGE_LR only soft prompts are usually trained (configure warns).
MAX_LR = 10.0
LARGE_LR = 1.0
# The choices of data.pii.types and data.augment.operations; data/pii.py and data/augment.py use these.
PII_TYPES = ("email", "phone", "credit_card", "iban", "ip", "name")
EDA_OPERATIONS = ("synonym", "insert", "swap", "delete")
# train.kernels' choices: deltatune.kernels' fused paths.
KERNELS = ("rms_norm", "swiglu", "lora_dropout", "shared_lora_dropout")

# train.report_to's choices: the module each needs and the pip requirement that provides it (train/tracking.py
# writes them; `pip install 'deltatune[tracking]'` installs both).
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard==2.21.0"), "mlflow": ("mlflow", "mlflow-skinny==3.17.2")}


def _one_of(key: str, value: Any, allowed: tuple) -> list[str]:
    return [] if value in allowed else [f"{key}: {value!r} is not one of {', '.join(allowed)}"]


def _greater_than_zero(values: dict[str, float]) -> list[str]:
    return [f"{key}: must be greater than 0, got {value}" for key, value in values.items() if value <= 0]


def _zero_or_more(values: dict[str, float]) -> list[str]:
    return [f"{key}: must be 0 or more, got {value}" for key, value in values.items() if value < 0]


@dataclass
class CleanConfig:
    normalize: bool = doc(True, "Unicode NFKC normalisation and whitespace collapsing of every text column.")
    strip_html: bool = doc(False, "Remove HTML tags and decode entities (&amp; -> &) in text columns.")
    min_chars: int = doc(0, "Reject rows whose input text is shorter than this many characters (0: no limit).")
    max_chars: int = doc(0, "Reject rows whose input text is longer than this many characters (0: no limit).")
    lowercase_labels: bool = doc(False, "Normalise labels: strip and lowercase ('Positive ' -> 'positive').")
    label_map: dict[str, str] = doc({}, "Rename labels after normalisation, e.g. {pos: positive, neg: negative}.")
    missing: dict[str, str] = doc({}, "Missing-value policy per column: error (a bad row, see data.on_error), "
                                      "drop (removed and counted) or fill (use data.clean.fill[column]). "
                                      "Columns not listed use 'error'.")
    fill: dict[str, str] = doc({}, "Values for columns whose missing policy is fill, e.g. {input: ''}.")

    def problems(self) -> list[str]:
        problems = []
        for column, policy in self.missing.items():
            key = f"data.clean.missing.{column}"
            if policy not in MISSING_POLICIES:
                problems += _one_of(key, policy, MISSING_POLICIES)
            elif policy == "fill" and column not in self.fill:
                problems.append(f"{key}: policy fill needs a value in data.clean.fill.{column}")
        return problems


@dataclass
class DedupConfig:
    exact: bool = doc(True, "Remove exact duplicates (after normalisation and case folding) within each split.")
    near: bool = doc(False, "Remove near duplicates within each split (MinHash/LSH over character n-grams).")
    threshold: float = doc(0.8, "Estimated Jaccard similarity at or above which two texts are near duplicates.")
    num_perm: int = doc(128, "MinHash permutations (more: slower, more accurate similarity estimates).")
    ngram: int = doc(5, "Character n-gram size of the MinHash shingles.")
    leakage: str = doc("report", "Eval/test rows that duplicate (exactly or nearly) a training row: "
                                 "'report' them or 'remove' them from eval/test.")

    def problems(self) -> list[str]:
        problems = _one_of("data.dedup.leakage", self.leakage, ("report", "remove"))
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"data.dedup.threshold: must be in (0, 1], got {self.threshold}")
        if self.num_perm < 16 or self.ngram < 1:
            problems.append("data.dedup: num_perm must be at least 16 and ngram at least 1")
        return problems


@dataclass
class PiiConfig:
    redact: bool = doc(False, "Replace PII with typed placeholders (<EMAIL>, <PHONE>, ...) before anything else.")
    types: list[str] = doc(list(PII_TYPES), "Which kinds of PII to redact.")
    columns: list[str] = doc([], "Columns to redact; empty means the task's text columns.")

    def problems(self) -> list[str]:
        return [f"data.pii.types: unknown kind {t!r}{did_you_mean(t, list(PII_TYPES))}; available: "
                f"{', '.join(PII_TYPES)}" for t in self.types if t not in PII_TYPES]


@dataclass
class AugmentConfig:
    eda: int = doc(0, "New training rows per row from EDA operations (synonym, insert, swap, delete); 0: off.")
    operations: list[str] = doc(list(EDA_OPERATIONS), "EDA operations to choose from.")
    alpha: float = doc(0.1, "EDA strength: share of the words changed per operation.")
    paraphrase: int = doc(0, "Paraphrases per training row generated by data.augment.paraphrase_model; 0: off.")
    paraphrase_model: str = doc("smollm2-135m", "Causal LM that writes paraphrases (local folder or packaged alias).")
    oversample: bool = doc(False, "Re-balance classes by repeating rows of the smaller classes (training only).")

    def problems(self) -> list[str]:
        problems = [f"data.augment.operations: unknown operation {o!r}; available: {', '.join(EDA_OPERATIONS)}"
                    for o in self.operations if o not in EDA_OPERATIONS]
        if self.eda < 0 or self.paraphrase < 0 or not 0.0 < self.alpha < 1.0:
            problems.append("data.augment: eda and paraphrase must be 0 or more, alpha in (0, 1)")
        return problems


@dataclass
class DataConfig:
    train: str = doc("", "Training data: a .csv/.tsv/.json/.jsonl/.parquet file, a saved `datasets` folder, a "
                         "folder written by `deltatune data prepare`, or a packaged data set by name: "
                         "pang-lee-sentences, pang-lee-reviews, conll2010-uncertainty, wsj-pos, oanc-pos, chatterbot "
                         "(`deltatune assets` shows them).")
    eval: str | None = doc(None, "Evaluation data (same formats). If unset, eval_fraction of train is held out.")
    test: str | None = doc(None, "Test data (same formats), prepared like eval. If unset, test_fraction of train is held out.")
    eval_fraction: float = doc(0.2, "Share of train held out for evaluation when data.eval is unset.")
    test_fraction: float = doc(0.0, "Share of train held out as a test split when data.test is unset (0: none).")
    kfold: int = doc(0, "Cross-validation: split train into k stratified folds and evaluate on fold data.fold (0: off).")
    fold: int = doc(0, "Which fold (0 .. kfold-1) is the evaluation split when data.kfold is set.")
    text_column: str = doc("text", "Column with the input text (classification; plain-text causal LM).")
    label_column: str = doc("label", "Column with the class label (classification).")
    prompt_column: str = doc("prompt", "Column with the prompt (causal-LM SFT; the source text for seq2seq).")
    response_column: str = doc("response", "Column with the response the model learns (causal-LM SFT; "
                                            "the target text for seq2seq).")
    tokens_column: str = doc("tokens", "Column with the words of a sentence (token classification): a list, "
                                       "or a string split on spaces.")
    tags_column: str = doc("tags", "Column with one tag per word (token classification), same form as tokens.")
    train_limit: int | None = doc(None, "Use at most this many training rows (after the split), for quick runs.")
    eval_limit: int | None = doc(None, "Use at most this many evaluation rows.")
    shots_per_class: int | None = doc(None, "Few-shot: keep exactly this many training rows per class (classification).")
    chat_template: bool = doc(True, "Format prompt/response pairs with the tokenizer's chat template if it has one.")
    format: str = doc("columns", "'columns': use the columns named above; 'instruction': build prompt/response from "
                                 "instruction, input and output columns (Alpaca style).")
    templates: dict[str, str] = doc({}, "Jinja2 templates that build a column from the row's columns, e.g. "
                                        "{prompt: 'Review: {{ text }}', response: '{{ label }}'}.")
    pack: bool = doc(False, "Causal LM: pack short examples into rows of train.max_length tokens (position ids "
                            "restart per example, so no attention crosses an example boundary).")
    on_error: str = doc("fail", "A malformed or invalid row: 'fail' stops with an error naming it; 'skip' writes "
                                "it to rejects.jsonl with its file, row and reason, and goes on.")
    control_chars: str = doc("reject", "Control characters (C0/C1 such as NUL, DEL; not tab or line breaks) in a "
                                       "label or tag: 'reject' makes the row a bad row (data.on_error: fail names "
                                       "file, row and column; skip writes it to rejects.jsonl), since 'positive\\x00' "
                                       "would silently become a class of its own; text columns are kept as they are. "
                                       "'strip': remove them from labels, tags and text columns; the data report "
                                       "counts the rows changed (control_chars_stripped).")
    tasks: dict[str, dict[str, str]] = doc({}, "Multi-task classification: task name -> {train, eval, text_column, "
                                                 "label_column} (eval and the columns optional; data.* fills them). "
                                                 "One model learns every task; metrics are reported per task.")
    task_prefix: bool = doc(True, "Multi-task: prefix every text with its task's name ('sentiment: ...') so the "
                                  "model knows the task. false: texts as they are; each example is still scored "
                                  "among its own task's labels (a run from `deltatune merge-deltas`, whose deltas "
                                  "were trained without prefixes, is written this way).")
    clean: CleanConfig = field(default_factory=CleanConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def problems(self) -> list[str]:
        """data.* and its subsections. Not here: the files data.train/eval/test name and data.tasks
        (configure.load_config checks them against packaged assets and the file system)."""
        problems = []
        if not self.train and not self.tasks:
            problems.append("data.train: required (a data file or a packaged alias such as pang-lee-sentences)")
        if not 0.0 < self.eval_fraction < 1.0:
            problems.append(f"data.eval_fraction: must be between 0 and 1, got {self.eval_fraction}")
        if not 0.0 <= self.test_fraction < 1.0 or self.eval_fraction + self.test_fraction >= 1.0:
            problems.append(f"data.test_fraction: must be in [0, 1) with eval_fraction + test_fraction < 1, "
                            f"got {self.test_fraction}")
        if self.kfold == 1 or self.kfold < 0 or (self.kfold and not 0 <= self.fold < self.kfold):
            problems.append(f"data.kfold / data.fold: need kfold >= 2 and 0 <= fold < kfold, got kfold={self.kfold}, "
                            f"fold={self.fold}")
        if self.kfold and self.eval:
            problems.append("data.kfold: cross-validation folds come from data.train; unset data.eval to use it")
        for key in ("train_limit", "eval_limit", "shots_per_class"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"data.{key}: must be at least 1, got {value}")
        problems += _one_of("data.format", self.format, ("columns", "instruction"))
        problems += _one_of("data.on_error", self.on_error, ("fail", "skip"))
        problems += _one_of("data.control_chars", self.control_chars, ("reject", "strip"))
        for section in (self.clean, self.dedup, self.pii, self.augment):
            problems += section.problems()
        return problems


@dataclass
class TrainConfig:
    epochs: int = doc(1, "Passes over the training data (max_steps wins if set).")
    max_steps: int = doc(0, "Stop after this many optimizer steps; 0 means epochs decide.")
    lr: float | Literal["auto"] | None = doc(
        None, "Peak learning rate of AdamW. Unset: the method's own default (each method's, from the literature: "
              "docs/methods.md; e.g. full 2e-5, lora 5e-4, prompt 0.3). auto: a learning-rate range test on the "
              "training split picks it before the run (Smith 2017; curve in the run's lr_find.json and "
              "lr_find.svg). A number: that rate.")
    lr_source: str = doc("", "Where train.lr came from, written by deltatune (the run's config.yaml, `deltatune "
                             "validate`): config, default of <method> (with its source), or auto (the range "
                             "test's pick). Not a setting: recomputed on every load (a run's auto pick is kept).")
    batch_size: int = doc(16, "Examples per forward pass.")
    grad_accum: int = doc(1, "Forward passes per optimizer step (effective batch = batch_size * grad_accum).")
    warmup_ratio: float = doc(0.06, "Share of optimizer steps spent warming the learning rate up linearly.")
    weight_decay: float = doc(0.0, "AdamW decoupled weight decay.")
    max_grad_norm: float = doc(1.0, "Clip the global gradient norm to this; 0 disables clipping.")
    max_length: int = doc(128, "Truncate tokenized examples to this many tokens.")
    seed: int = doc(42, "Seed for data order, initialisation and dropout.")
    eval_every: int = doc(0, "Evaluate every N optimizer steps; 0 means at the end of each epoch.")
    save_every: int = doc(0, "Write a resumable checkpoint every N optimizer steps; 0 means at every evaluation. "
                             "PPO, GRPO: every N iterations; 0 means once per pass over the training prompts.")
    eval_batch_size: int = doc(64, "Examples per forward pass during evaluation.")
    progress: bool = doc(True, "Show a progress bar with loss, tokens/s and ETA.")
    chunked_loss: bool = doc(True, "Causal LM: compute the cross-entropy from the final hidden states a chunk of "
                                   "positions at a time, only where a token is predicted, so the (batch x length x "
                                   "vocabulary) logits never exist at once. Same loss, less memory, and no "
                                   "vocabulary projection for prompt and padding positions. Soft-prompt methods and "
                                   "other tasks use the plain loss.")
    bf16: bool | str = doc("auto", "Mixed precision: run forward and loss under bfloat16 autocast (weights and "
                                   "optimizer stay fp32, the loss is taken in fp32; evaluation stays fp32). auto: on "
                                   "where bf16 matrix products are faster: CUDA devices that support bf16, CPUs whose "
                                   "bf16 products measure at least twice fp32's speed when training starts (a 50 ms "
                                   "check: Zen 4 EPYCs 4x, AMX Xeons; not AVX512-BF16 Xeons, where they run at half "
                                   "speed); DELTATUNE_AUTO_BF16=1/0 answers instead; true; false.")
    gradient_checkpointing: bool = doc(False, "Recompute each transformer layer's activations in backward instead of "
                                              "keeping them: much less activation memory for up to a third more "
                                              "compute per step. Same results.")
    kernels: list[str] = doc(["rms_norm", "swiglu", "lora_dropout"],
                             "deltatune's fused paths to train with, each where the model has the block: rms_norm "
                             "(RMSNorm layers), swiglu (gated SiLU MLPs) and lora_dropout (a LoRA branch's dropout "
                             "with its A, the same random draws) compute what the modules compute and keep "
                             "less for backward; shared_lora_dropout (opt-in) gives LoRA branches that read the same "
                             "tensor (q, k and v) one dropout mask instead of one each, which changes the training "
                             "noise (BENCHMARKS.md). [] trains with the model's own modules only.")
    return_freed_memory: bool = doc(False, "Linux, on glibc's malloc (DELTATUNE_ALLOCATOR=system, or no tcmalloc on the "
                                           "machine): tensors of 1 MiB and more get pages of their own, returned to "
                                           "the system when freed, instead of a heap that keeps freed activation "
                                           "memory counted in the process. A lower peak for a slower step (every "
                                           "large tensor is fresh pages to fault in): SmolLM2 LoRA 0.78x the peak at "
                                           "0.79x the speed (BENCHMARKS.md); tcmalloc, the default where present, "
                                           "keeps the peak lower at full speed. Process-wide from the run's start; "
                                           "other systems: no effect.")
    group_by_length: bool = doc(True, "Batch examples of similar length together (sorted within windows of 50 "
                                      "batches, then the batches shuffled; seeded by seed and epoch, so resuming "
                                      "stays exact): less padding, faster steps (MiniLM on sentences: 1.7-2.3x, "
                                      "BENCHMARKS.md). Batches are no longer uniform samples, which can matter for "
                                      "very small data sets: false gives plain shuffled batches.")
    on_nonfinite: str = doc("fail", "A loss or gradient that is NaN or infinite: fail stops the run as failed (its "
                                    "last checkpoint and best delta kept, resumable); skip leaves the weights "
                                    "untouched for that step and goes on (the count is in metrics.json).")
    report_to: list[str] = doc([], "Also write the run's log (every scalar of log.jsonl at its step), its config and "
                                   "final metrics with these trackers' own writers, inside the run directory (nothing "
                                   "leaves the machine): tensorboard (event files in RUN/tensorboard; open with "
                                   "`tensorboard --logdir RUN/tensorboard`), mlflow (an MLflow store in RUN/mlflow; "
                                   "`mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`). Needs `pip "
                                   "install 'deltatune[tracking]'`. Empty: log.jsonl alone.")

    def problems(self) -> list[str]:
        problems = _greater_than_zero({**({"train.lr": self.lr} if isinstance(self.lr, float) else {}),
                                       "train.batch_size": self.batch_size,
                                       "train.grad_accum": self.grad_accum, "train.max_length": self.max_length,
                                       "train.epochs": self.epochs, "train.eval_batch_size": self.eval_batch_size})
        problems += _zero_or_more({"train.max_steps": self.max_steps, "train.weight_decay": self.weight_decay,
                                   "train.max_grad_norm": self.max_grad_norm, "train.eval_every": self.eval_every,
                                   "train.save_every": self.save_every})
        if isinstance(self.lr, float) and self.lr > MAX_LR:
            problems.append(f"train.lr: {self.lr:g} is far too large to train with (every update would overshoot); "
                            f"use at most {MAX_LR:g}: typical values are 1e-5 to 1e-4 for full fine-tuning, "
                            "1e-4 to 1e-3 for LoRA and adapters, up to 0.3 for prompt tuning")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not isinstance(self.bf16, bool) and self.bf16 != "auto":
            problems.append(f"train.bf16: use auto, true or false, got {self.bf16!r}")
        if self.on_nonfinite not in ("fail", "skip"):
            problems.append(f"train.on_nonfinite: use fail or skip, got {self.on_nonfinite!r}")
        problems += [f"train.kernels: unknown fused path {name!r}; known: {', '.join(KERNELS)} ([] for none)"
                     for name in self.kernels if name not in KERNELS]
        return problems + _tracker_problems(self.report_to)


def _tracker_problems(names: list[str]) -> list[str]:
    """train.report_to: known trackers, each named once, whose library is installed (found, not imported)."""
    problems = [f"train.report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}"
                for name in names if name not in TRACKERS]
    problems += [f"train.report_to: {name} is named twice" for name in sorted(set(names)) if names.count(name) > 1]
    for name in dict.fromkeys(n for n in names if n in TRACKERS):
        module, requirement = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            problems.append(f"train.report_to: {name} needs the {module} library, which is not installed: "
                            f"pip install '{requirement}' (or pip install 'deltatune[tracking]')")
    return problems


@dataclass
class EvalConfig:
    forgetting: bool = doc(True, "Causal LM: perplexity on general English text (OANC sentences) before and after "
                                 "tuning, to see catastrophic forgetting.")
    forgetting_rows: int = doc(200, "Sentences of general text the forgetting meter scores.")
    icl_shots: list[int] = doc([], "Classification with a decoder base model: zero/k-shot in-context baselines "
                                   "scored next to the tuned model, e.g. [0, 4].")
    icl_limit: int = doc(200, "Evaluation rows the in-context baselines score (each costs one forward per label).")

    def problems(self) -> list[str]:
        if self.forgetting_rows < 1 or self.icl_limit < 1 or any(k < 0 for k in self.icl_shots):
            return ["eval: forgetting_rows and icl_limit must be at least 1, icl_shots 0 or more"]
        return []


@dataclass
class RewardConfig:
    loss: str = doc("pairwise", "Task reward: 'pairwise' (Bradley-Terry, -log sigmoid(r_chosen - r_rejected), over every "
                                "chosen/rejected pair; a ranking of k responses gives k(k-1)/2 pairs) or 'listwise' "
                                "(Plackett-Luce over each full ranking).")

    def problems(self) -> list[str]:
        return _one_of("reward.loss", self.loss, ("pairwise", "listwise"))


@dataclass
class DpoConfig:
    beta: float = doc(0.1, "Task dpo: strength of the implicit KL constraint to the reference (the base model).")
    loss: str = doc("sigmoid", "'sigmoid' (DPO, Rafailov et al. 2023) or 'ipo' (Azar et al. 2023).")

    def problems(self) -> list[str]:
        return _one_of("dpo.loss", self.loss, ("sigmoid", "ipo")) + _greater_than_zero({"dpo.beta": self.beta})


@dataclass
class OrpoConfig:
    lam: float = doc(0.1, "Task orpo: lambda, the weight of the odds-ratio loss against the SFT loss on the chosen "
                          "response (Hong et al. 2024; TRL's ORPOConfig.beta). 0: SFT on the chosen responses only.")

    def problems(self) -> list[str]:
        return _zero_or_more({"orpo.lam": self.lam})


@dataclass
class SimpoConfig:
    beta: float = doc(2.0, "Task simpo: scale of the length-normalised reward beta/|y| * log p(y|x) (the experiments "
                           "of Meng et al. 2024 use 2.0 to 2.5).")
    gamma: float = doc(1.0, "Task simpo: target margin between the chosen and the rejected reward (the defaults give "
                            "gamma/beta = 0.5).")

    def problems(self) -> list[str]:
        return _greater_than_zero({"simpo.beta": self.beta}) + _zero_or_more({"simpo.gamma": self.gamma})


@dataclass
class KtoConfig:
    beta: float = doc(0.1, "Task kto: scale of the log-ratios to the reference (the base model) inside the sigmoid "
                           "of the value function (Ethayarajh et al. 2024; TRL's KTOConfig.beta).")
    desirable_weight: float = doc(1.0, "Task kto: weight of the loss of desirable (thumbs-up) rows. The paper "
                                       "recommends desirable_weight * #desirable / (undesirable_weight * "
                                       "#undesirable) in [1, 4/3]; training notes when it is outside.")
    undesirable_weight: float = doc(1.0, "Task kto: weight of the loss of undesirable (thumbs-down) rows.")

    def problems(self) -> list[str]:
        return _greater_than_zero({"kto.beta": self.beta, "kto.desirable_weight": self.desirable_weight,
                                   "kto.undesirable_weight": self.undesirable_weight})


@dataclass
class PpoConfig:
    reward_model: str | None = doc(None, "Task ppo: run directory of a trained reward model (task reward) or classifier "
                                         "(task classification) that scores prompt + response.")
    reward_label: str | None = doc(None, "With a classifier as reward model: the label whose log-odds is the reward "
                                         "(e.g. positive).")
    reward_fn: str | None = doc(None, "Instead of a reward model: a Python callable 'module:function' or "
                                      "'path/to/file.py:function' taking (prompts, responses) -> list of floats. This runs "
                                      "your code: train imports it when the run starts (validate and plan do not); "
                                      "use only configs you trust.")
    rollout_batch: int = doc(16, "Prompts sampled per PPO iteration (train.max_steps iterations in all).")
    minibatch: int = doc(4, "Rollouts per gradient step inside an iteration.")
    ppo_epochs: int = doc(4, "Passes over each iteration's rollouts.")
    max_new_tokens: int = doc(24, "Length of each sampled response.")
    temperature: float = doc(1.0, "Sampling temperature of the rollouts.")
    top_k: int = doc(0, "Sample only from the k likeliest tokens (0: the whole vocabulary).")
    clip_range: float = doc(0.2, "Clipped surrogate: the probability ratio is clipped to [1 - c, 1 + c].")
    value_clip: float = doc(0.2, "Value predictions move at most this far from the rollout's values per iteration.")
    vf_coef: float = doc(0.1, "Weight of the value loss in the PPO loss.")
    entropy_coef: float = doc(0.0, "Weight of an entropy bonus (0: none).")
    gamma: float = doc(1.0, "Discount factor of GAE.")
    lam: float = doc(0.95, "GAE lambda.")
    kl_coef: float = doc(0.05, "Initial weight of the per-token KL penalty against the reference (the base model).")
    target_kl: float | None = doc(6.0, "Adaptive KL controller's target KL per response (null: a fixed kl_coef).")
    kl_horizon: int = doc(10000, "Adaptive KL controller's horizon (Ziegler et al. 2019).")

    def source_problems(self, required: bool = True) -> list[str]:
        """What is wrong with the choice of reward source, without loading it. A missing source is a
        problem only when ``required`` (a run starting): a shipped config may leave it to the command line."""
        if bool(self.reward_model) == bool(self.reward_fn) and (self.reward_model or required):
            what = "both are set" if self.reward_model else "neither is set"
            return [f"ppo.reward_model / ppo.reward_fn: give exactly one reward source ({what}): "
                    "ppo.reward_model=RUN_DIR (a classification or reward run) or ppo.reward_fn='module:function'"]
        if self.reward_fn and self.reward_label:
            return ["ppo.reward_label: only used with a classifier as ppo.reward_model; unset it when using "
                    "ppo.reward_fn"]
        return []

    def problems(self, need_source: bool = False) -> list[str]:
        """Every problem with the ppo.* values, at once (a missing reward source only if ``need_source``).
        Only task ppo reads this section: configure.task_problems checks it for that task alone."""
        problems = self.source_problems(need_source)
        at_least = {"rollout_batch": (self.rollout_batch, 2), "minibatch": (self.minibatch, 1),
                    "ppo_epochs": (self.ppo_epochs, 1), "max_new_tokens": (self.max_new_tokens, 1),
                    "kl_horizon": (self.kl_horizon, 1), "top_k": (self.top_k, 0)}
        problems += [f"ppo.{k}: must be at least {low}, got {v}" for k, (v, low) in at_least.items() if v < low]
        if self.minibatch > self.rollout_batch:
            problems.append(f"ppo.minibatch: {self.minibatch} is more than ppo.rollout_batch ({self.rollout_batch})")
        problems += _greater_than_zero({"ppo.temperature": self.temperature, "ppo.clip_range": self.clip_range,
                                        "ppo.value_clip": self.value_clip,
                                        "ppo.target_kl": self.target_kl if self.target_kl is not None else 1.0})
        problems += _zero_or_more({"ppo.vf_coef": self.vf_coef, "ppo.entropy_coef": self.entropy_coef,
                                   "ppo.kl_coef": self.kl_coef})
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append(f"ppo.gamma / ppo.lam: need 0 < gamma <= 1 and 0 <= lam <= 1, got {self.gamma}, "
                            f"{self.lam}")
        return problems


GRPO_REWARD_FUNCTIONS = ("arithmetic", "format")  # built in (rlhf/rewards.py); other names are 'module:function'
GRPO_REWARD_KEYS = ("function", "run", "weight", "label", "pattern")


@dataclass
class GrpoConfig:
    rewards: list[dict[str, str]] = doc([], "Task grpo: the reward, a weighted sum of sources, each {function: NAME, "
                                            "weight: W} or {run: RUN_DIR, weight: W}. NAME: arithmetic (1 if the "
                                            "completion's last number equals the row's answer column), format (1 if "
                                            "the completion matches the regex given as pattern: REGEX), or "
                                            "'module:function' / 'path/to/file.py:function' (your code: train runs "
                                            "it). RUN_DIR: a reward run, or a classifier run with label: LABEL (its "
                                            "log-odds). weight defaults to 1.")
    group_size: int = doc(4, "Completions sampled per prompt: the group whose mean and std normalise the rewards.")
    prompts_per_step: int = doc(4, "Prompts per iteration (train.max_steps iterations in all); each iteration "
                                   "samples prompts_per_step x group_size completions.")
    minibatch: int | None = doc(None, "Completions per gradient step (null: the whole batch, one step per epoch).")
    epochs_per_batch: int = doc(1, "Passes over each iteration's completions (TRL's num_iterations; 1: on-policy).")
    clip: float = doc(0.2, "Clipped objective: the probability ratio to the sampling policy is clipped to "
                           "[1 - clip, 1 + clip].")
    beta: float = doc(0.04, "Weight of the KL penalty to the reference, the base model (the k3 estimator per "
                            "token); 0: none.")
    aggregate: str = doc("sequence", "'sequence': each completion's mean token loss, then the mean over "
                                     "completions (the paper; TRL's loss_type grpo); 'token': the mean over all "
                                     "tokens of the minibatch (TRL's bnpo).")
    max_new_tokens: int = doc(32, "Length limit of each sampled completion.")
    temperature: float = doc(1.0, "Sampling temperature of the completions.")
    top_k: int = doc(0, "Sample only from the k likeliest tokens (0: the whole vocabulary).")

    def reward_problems(self, required: bool = True) -> list[str]:
        """What is wrong with grpo.rewards, without loading anything (no run, no module). No rewards at all
        is a problem only when ``required`` (a run starting): a shipped config may leave them to the command line."""
        if not self.rewards:
            return ["grpo.rewards: no reward given; e.g. grpo.rewards='[{function: arithmetic}]' or "
                    "'[{run: RUN_DIR, weight: 1}]'"] if required else []
        problems = []
        for i, entry in enumerate(self.rewards):
            problems += _grpo_reward_problems(f"grpo.rewards[{i}]", entry)
        return problems

    def problems(self, need_rewards: bool = False) -> list[str]:
        """Every problem with the grpo.* values, at once (no rewards at all only if ``need_rewards``).
        Only task grpo reads this section: its ``Task.problems`` checks it."""
        problems = self.reward_problems(need_rewards)
        if self.group_size < 2:
            problems.append(f"grpo.group_size: must be at least 2, got {self.group_size} (the advantages compare "
                            "each completion with the others of its group)")
        at_least = {"prompts_per_step": (self.prompts_per_step, 1), "epochs_per_batch": (self.epochs_per_batch, 1),
                    "max_new_tokens": (self.max_new_tokens, 1), "top_k": (self.top_k, 0),
                    "minibatch": (1 if self.minibatch is None else self.minibatch, 1)}
        problems += [f"grpo.{k}: must be at least {low}, got {v}" for k, (v, low) in at_least.items() if v < low]
        batch = self.prompts_per_step * self.group_size
        if self.minibatch and self.minibatch > batch:
            problems.append(f"grpo.minibatch: {self.minibatch} is more than the {batch} completions of a batch "
                            "(prompts_per_step x group_size); lower it or leave it unset for the whole batch")
        problems += _greater_than_zero({"grpo.temperature": self.temperature, "grpo.clip": self.clip})
        problems += _zero_or_more({"grpo.beta": self.beta})
        return problems + _one_of("grpo.aggregate", self.aggregate, ("sequence", "token"))


def _grpo_reward_problems(key: str, entry: dict) -> list[str]:
    unknown = [k for k in entry if k not in GRPO_REWARD_KEYS]
    problems = [f"{key}.{k}: unknown key{did_you_mean(str(k), list(GRPO_REWARD_KEYS))}" for k in unknown]
    function, run = entry.get("function"), entry.get("run")
    if bool(function) == bool(run):
        return problems + [f"{key}: give exactly one of function: NAME or run: RUN_DIR "
                           f"({'both are set' if function else 'neither is set'})"]
    try:
        weight_ok = math.isfinite(float(entry.get("weight", 1)))
    except (TypeError, ValueError):
        weight_ok = False
    if not weight_ok:
        problems.append(f"{key}.weight: expected a finite number, got {entry['weight']!r}")
    if run and "pattern" in entry:
        problems.append(f"{key}.pattern: only the format function reads a pattern; unset it for a run")
    if function and "label" in entry:
        problems.append(f"{key}.label: only a classifier run reads a label; unset it for a function")
    if function and function not in GRPO_REWARD_FUNCTIONS and ":" not in function:
        problems.append(f"{key}.function: {function!r} is neither a built-in reward "
                        f"({', '.join(GRPO_REWARD_FUNCTIONS)}) nor 'module:function' / 'path/to/file.py:function'")
    if function == "format":
        problems += _pattern_problems(f"{key}.pattern", entry.get("pattern"))
    elif function and "pattern" in entry:
        problems.append(f"{key}.pattern: only the format function reads a pattern; unset it for {function}")
    return problems


def _pattern_problems(key: str, pattern: str | None) -> list[str]:
    if not pattern:
        return [f"{key}: the format reward needs the regex a completion must match, e.g. pattern: '^[0-9]+$'"]
    try:
        re.compile(pattern)
    except re.error as exc:
        return [f"{key}: {pattern!r} is not a valid regular expression ({exc})"]
    return []


@dataclass
class MethodConfig:
    name: str = doc("lora", "Adaptation method (see `deltatune methods`).")
    options: Any = None  # the method's own Options dataclass, filled in by configure.load_config


@dataclass
class Config:
    model: str = doc("minilm", "Base model: a local Hugging Face folder, or a packaged alias (minilm, smollm2-135m).")
    task: str = doc("classification", "What to train: a registered task (`deltatune tasks` lists them: "
                                      "classification, token_classification, causal_lm, seq2seq, reward, dpo, orpo, "
                                      "simpo, kto, ppo, grpo).")
    name: str | None = doc(None, "Run name; defaults to <model>-<task>-<method>.")
    output_dir: str | None = doc(None, "Run directory; defaults to runs/<name>-<timestamp>.")
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    simpo: SimpoConfig = field(default_factory=SimpoConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)
    ppo: PpoConfig = field(default_factory=PpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)

    @property
    def run_name(self) -> str:
        model = Path(self.model).name if "/" in self.model else self.model
        return self.name or f"{model}-{self.task}-{self.method.name}"

    def problems(self) -> list[str]:
        """Every section's own problems. Not ppo.*: only task ppo reads it, so configure.task_problems
        checks it for that task; nor the method's options (configure builds them through its registry)."""
        problems = []
        if self.output_dir is not None and not self.output_dir.strip():
            problems.append(EMPTY_OUTPUT_DIR)
        sections = (self.data, self.train, self.eval, self.reward, self.dpo, self.orpo, self.simpo, self.kto)
        return problems + [p for section in sections for p in section.problems()]


EMPTY_OUTPUT_DIR = ("output_dir: empty; give the run directory (e.g. output_dir=runs/my-run), or leave output_dir "
                    "out for runs/<name>-<timestamp>")


# ----------------------------------------------------------------------------- parsing

def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["train.lr=1e-4", "method.r=16"]`` into a nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)"],
                              source="command line")
        key, raw = item.split("=", 1)
        if not raw.strip() and key.strip() == "output_dir":  # `output_dir=$OUT` with OUT unset
            raise ConfigError([EMPTY_OUTPUT_DIR], source="command line")
        try:
            value = load_yaml(raw, "command line", key.strip()) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError([f"override {item!r}: the value is not valid YAML ({exc.__class__.__name__}: "
                               f"{getattr(exc, 'problem', None) or exc}); quote it, e.g. {key}='...'"],
                              source="command line") from exc
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"override {item!r} sets a key below {part!r}, which is a value"],
                                  source="command line")
        node[leaf] = value
    return tree


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class DuplicateKeys(yaml.YAMLError):
    def __init__(self, found: list[tuple[str, list[int]]]):
        super().__init__(f"keys given more than once: {found}")
        self.found = found


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key written twice in one mapping (plain YAML keeps the
    later value without a word). Keys brought in by a merge (``<<: *defaults``) may still be
    overridden, as YAML intends."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        found = sorted(_duplicate_keys(node, "", set()), key=lambda f: f[1])
        if found:
            raise DuplicateKeys(found)
        return self.construct_document(node)


_MERGE = "tag:yaml.org,2002:merge"


def _duplicate_keys(node: yaml.Node, path: str, seen: set[int]):
    """(key path, line numbers) of every key written more than once in one mapping, at any depth."""
    if id(node) in seen:  # an alias of a node already walked (or a recursive one)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, f"{path}[{i}]", seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple, list[int]] = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                yield from _duplicate_keys(value, path, seen)
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else "<complex key>"
            if isinstance(key, yaml.ScalarNode):  # `lr` and `"lr"` are one key, `1` and `"1"` are two
                lines.setdefault((key.tag, key.value), []).append(key.start_mark.line + 1)
            yield from _duplicate_keys(value, f"{path}.{name}" if path else str(name), seen)
        for (_, name), at in lines.items():
            if len(at) > 1:
                yield (f"{path}.{name}" if path else str(name)), at


def load_yaml(text: str, source: str, prefix: str = "") -> Any:
    """YAML text -> data, refusing keys given twice. ``prefix``: the key path the text sits under
    (an override's key). Raises yaml.YAMLError for text that is not YAML."""
    try:
        return yaml.load(text, Loader=ConfigLoader)
    except DuplicateKeys as exc:
        problems = []
        for key, at in exc.found:
            key = f"{prefix}.{key}" if prefix else key
            where = "" if prefix else f" (lines {', '.join(map(str, at[:-1]))} and {at[-1]})"
            problems.append(f"{key}: given {_times(len(at))}{where}; YAML would silently keep only the last "
                            "value. Keep one")
        raise ConfigError(problems, source=source) from None


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


def read_yaml(path: str | Path, keys: str = "model:, task:, method:, ...") -> dict:
    """A YAML file whose top level is a mapping (``keys``: examples of its keys, for the message)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist"], source=str(path))
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot parse YAML: {exc}"], source=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"the top level must be a mapping of keys ({keys})"],
                          source=str(path))
    return data


@dataclass
class ParsedConfig:
    """A config read, merged and checked on its own; configure.load_config finishes it."""
    cfg: Config               # cfg.method is MethodConfig(): its options need the method registry
    method: dict | None       # the method section as written ({name: lora, r: 8}); None if it is malformed
    problems: list[str]       # unknown keys, wrong types, each section's own problems
    source: str               # the file, or "command line", for the ConfigError


def parse_config(path: str | Path | dict | None = None, overrides: list[str] | None = None) -> ParsedConfig:
    """Read and merge a config file and overrides, collecting (not raising) every problem found
    without a registry or the file system. Raises ConfigError only for unreadable YAML or overrides.
    ``path`` may also be a config already in memory, as ``to_dict`` gives it: checked as its file would be."""
    extra = parse_overrides(overrides or [])
    written = path if isinstance(path, dict) else read_yaml(path) if path else {}
    raw = deep_merge(_for_method(written, extra), extra)
    problems: list[str] = []
    method_raw = raw.pop("method", {}) or {}
    cfg = build_section(Config, raw, "", problems)
    method = _method_section(method_raw, problems)
    source = "config" if isinstance(path, dict) else str(path) if path else "command line"
    return ParsedConfig(cfg, method, problems + cfg.problems(), source)


def _for_method(raw: dict, extra: dict) -> dict:
    """A file's ``method:`` options belong to the method it names: when an override switches to another
    method (``method.name=bitfit`` on a LoRA config, as compare and tune do), they are dropped, since a
    LoRA ``r`` means nothing to BitFit."""
    def name(section: Any) -> Any:
        return section if isinstance(section, str) else section.get("name") if isinstance(section, dict) else None

    chosen, written = name(extra.get("method")), raw.get("method")
    if chosen is None or not written or (name(written) or MethodConfig.name) == chosen:
        return raw
    return {**raw, "method": {"name": chosen}}


def _method_section(raw: Any, problems: list[str]) -> dict | None:
    if isinstance(raw, str):  # `method: lora` shorthand
        return {"name": raw}
    if not isinstance(raw, dict):
        problems.append(f"method: expected a mapping (method: {{name: lora, r: 8}}), got {raw!r}")
        return None
    return dict(raw)


def build_section(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, appending (not raising) every problem."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "options"}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key{did_you_mean(str(key), list(fields))}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = build_section(kind, value, f"{prefix}{key}.", problems)
            continue
        try:
            values[key] = coerce(value, kind)
        except (TypeError, ValueError) as exc:
            problems.append(f"{prefix}{key}: {exc}")
    return cls(**values)


def coerce(value: Any, kind: Any) -> Any:
    """Check ``value`` against a type annotation, converting where the intent is unambiguous."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        choices = [str(v) for arg in args if typing.get_origin(arg) is typing.Literal for v in typing.get_args(arg)]
        raise ValueError(errors[0] + (f"; or use {' or '.join(choices)}" if choices else ""))
    if origin is typing.Literal:
        if value in typing.get_args(kind):
            return value
        raise ValueError(f"expected {' or '.join(map(str, typing.get_args(kind)))}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping (key: value), got {value!r}")
        key_kind, value_kind = typing.get_args(kind)
        return {coerce(k, key_kind): coerce(v, value_kind) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(v, item) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"expected a whole number, got {value!r}")
    if kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"expected a number, got {value!r}")
        if not math.isfinite(number):  # .nan / .inf in YAML, nan / inf / 1e999 on the command line
            raise ValueError(f"expected a finite number, got {value!r}; nan and infinity are never valid settings")
        return number
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected text, got {value!r}")
    if isinstance(kind, type) and isinstance(value, kind):
        return value
    raise ValueError(f"expected {kind}, got {value!r}")


def describe(cls: type, prefix: str = "", note: str = "") -> list[str]:
    """Every field of dataclass ``cls`` (sections walked into) with its default and ``help``: what
    ``--explain`` prints, one key per entry."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "options":
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], f"{prefix}{f.name}.", note)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{prefix}{f.name}{note} = {default!r}\n    {f.metadata.get('help', '')}")
    return lines


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'lr'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what config.yaml in a run directory holds)."""
    out = dataclasses.asdict(dataclasses.replace(cfg, method=MethodConfig(cfg.method.name)))
    options = dataclasses.asdict(cfg.method.options) if cfg.method.options is not None else {}
    out["method"] = {"name": cfg.method.name, **options}
    return out


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
