"""The baseline side of benchmarks/run.py: transformers ``Trainer`` (+ peft for LoRA), as a user would
write it, with the Trainer's defaults except what must match our side.

Matched: the prepared examples and their order (the dataset is handed over in our loop's order and
read sequentially), batch size, steps, learning rate with linear decay and no warm-up, weight decay,
gradient clipping, seed, and the peft ``LoraConfig`` (r, alpha, dropout, target modules; the new
classification head trains too). Left at the Trainer's defaults: its optimizer (fused AdamW), fp32,
and dynamic padding by a stock collator: ``DataCollatorWithPadding`` (the Trainer's default) for
classification; ``DataCollatorForSeq2Seq`` for the causal LM, which pads the examples' own labels
with -100. (``DataCollatorForLanguageModeling`` would also mask the end-of-text token, which is
SmolLM2's padding token, and so train on fewer tokens than our side.)
Step time: ``on_step_begin`` to ``on_step_end``, which brackets forward, backward, clipping,
optimizer and scheduler, after the batch is collated.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from bench_common import Step, check_budget, checksum, now, summarize, train_order
from deltatune.assets import resolve_model
from deltatune.tasks import prepare


class StepTimer(TrainerCallback):
    def __init__(self):
        self.begin = 0.0
        self.ends: list[tuple[float, float, float]] = []  # (step seconds, wall, cpu) at each step's end

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        wall, cpu = now()
        self.ends.append((wall - self.begin, wall, cpu))


class CountingCollator:
    """Wraps a collator and notes each batch's non-padding tokens, in the order batches are made."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def load(cfg, path: Path, labels: list[str] | None, tokenizer):
    kwargs = dict(dtype=torch.float32, use_safetensors=True)
    if cfg.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.method.name == "full":
        return model
    if cfg.method.name != "lora":
        raise SystemExit(f"baseline: method {cfg.method.name!r} has no baseline here (full and lora do)")
    o = cfg.method.options
    task = TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM
    return get_peft_model(model, LoraConfig(task_type=task, r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
                                            target_modules=o.target_modules))


def measure(cfg, warmup: int, workdir: Path, bf16: bool = False) -> dict:
    t = cfg.train
    path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    data = prepare(cfg, tokenizer)
    examples = data.train.examples
    check_budget(len(examples), t.batch_size, t.max_steps)
    order = train_order(len(examples), t.seed)
    set_seed(t.seed)
    model = load(cfg, path, data.labels, tokenizer)
    stock = DataCollatorWithPadding(tokenizer) if cfg.task == "classification" else DataCollatorForSeq2Seq(tokenizer)
    collator, timer = CountingCollator(stock), StepTimer()
    args = TrainingArguments(
        output_dir=str(workdir / "baseline-run"), per_device_train_batch_size=t.batch_size, max_steps=t.max_steps,
        learning_rate=t.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, seed=t.seed, train_sampling_strategy="sequential", save_strategy="no",
        eval_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True, use_cpu=True, bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=[examples[i] for i in order[:t.max_steps * t.batch_size]],
                      data_collator=collator, processing_class=tokenizer, callbacks=[timer])
    start = checksum(model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [Step(s, n, loss, wall, cpu) for (s, wall, cpu), n, loss in zip(timer.ends, collator.tokens, losses)]
    if not len(steps) == len(collator.tokens) == len(losses) == t.max_steps:
        raise SystemExit(f"baseline: expected {t.max_steps} steps, got {len(timer.ends)} timed, "
                         f"{len(collator.tokens)} batches and {len(losses)} losses")
    return {**summarize(steps, warmup, examples, order, t.batch_size),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "init_checksum": start, "bf16": bf16, "optimizer": str(args.optim.value)}
