"""Load a finished run (base + delta) and use it: evaluate on new data, label texts, generate."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel
from torch import nn

from .config import Config, load_config
from .data.collate import pad
from .data.examples import prepare_eval_file, prompt_ids, reward_ids
from .errors import RunError
from .eval.evaluate import evaluate
from .methods import registry
from .models import load_model, load_tokenizer
from .rundir import RunDir
from .tasks import registry as tasks


@dataclass
class LoadedRun:
    run: RunDir
    cfg: Config
    model: nn.Module
    tokenizer: object
    labels: list[str] | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_run(path: str | Path) -> LoadedRun:
    run = RunDir(Path(path))
    run.require_complete()
    cfg = load_config(run.config, check_paths=False)
    labels = run.read_json("labels.json")["labels"] if (run.path / "labels.json").is_file() else None
    tokenizer = load_tokenizer(run.tokenizer)
    method = registry.get(cfg.method.name)
    base = load_model(cfg.model, cfg.task, labels, tokenizer.pad_token_id, **method.load_kwargs(cfg.method.options))
    model = method.load_delta(base, run.delta, cfg.method.options, tasks.get(cfg.task))
    model.to(PartialState().device).eval()  # the GPU when there is one, as in training
    return LoadedRun(run, cfg, model, tokenizer, labels)


def evaluate_file(loaded: LoadedRun, data_path: str) -> dict:
    """Metrics of the tuned model on another file (read with the run's columns and label set;
    for dpo, a preference file, with the base model as the reference)."""
    cfg = loaded.cfg
    examples = prepare_eval_file(cfg, loaded.tokenizer, data_path, loaded.labels)
    examples = registry.get(cfg.method.name).prepare_examples(loaded.model, examples)
    batch, pad = cfg.train.eval_batch_size, loaded.tokenizer.pad_token_id
    if cfg.task == "dpo":
        from .rlhf.dpo import add_reference_logps

        with _base_model(loaded) as reference:
            examples = add_reference_logps(reference, examples, batch, pad, cfg.train.chunked_loss)
    return evaluate(loaded.model, examples, cfg.task, batch, pad, loaded.labels, cfg.train.chunked_loss)


@contextmanager
def _base_model(loaded: LoadedRun):
    """The base model of a loaded run: its adapter switched off, or (methods that changed the base
    weights) a fresh copy of the base, loaded for the occasion."""
    model = loaded.model
    if isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning:
        yield model.get_base_model()  # the virtual tokens live outside the wrapped model
    elif isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        cfg = loaded.cfg
        base = load_model(cfg.model, cfg.task, loaded.labels, loaded.tokenizer.pad_token_id,
                          **registry.get(cfg.method.name).load_kwargs(cfg.method.options))
        yield base.to(loaded.device).eval()


@torch.no_grad()
def score(loaded: LoadedRun, prompts: list[str], responses: list[str]) -> list[float]:
    """A reward model's score of each (prompt, response), formatted and truncated as in training."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    if cfg.task != "reward":
        raise RunError(f"{loaded.run.path}: a {cfg.task} run, not a reward model (task reward); "
                       "score needs a run trained with task: reward")
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    ids = reward_ids(tok, prompts, responses, cfg.data.chat_template, cfg.train.max_length)
    out: list[float] = []
    for start in range(0, len(ids), cfg.train.eval_batch_size):
        input_ids, mask = pad(ids[start:start + cfg.train.eval_batch_size], tok.pad_token_id)
        logits = loaded.model(input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device)).logits
        out += logits[:, 0].float().cpu().tolist()
    return out


@torch.no_grad()
def classify(loaded: LoadedRun, texts: list[str]) -> list[dict]:
    enc = loaded.tokenizer(texts, truncation=True, max_length=loaded.cfg.train.max_length,
                           padding=True, return_tensors="pt").to(loaded.device)
    probs = torch.softmax(loaded.model(input_ids=enc["input_ids"],
                                       attention_mask=enc["attention_mask"]).logits.float(), -1).cpu()
    out = []
    for text, p in zip(texts, probs):
        out.append({"text": text, "label": loaded.labels[int(p.argmax())],
                    "probabilities": {name: round(float(v), 6) for name, v in zip(loaded.labels, p)}})
    return out


@torch.no_grad()
def tag(loaded: LoadedRun, texts: list[str]) -> list[dict]:
    """One tag per whitespace-separated word, read at each word's first sub-word token."""
    out = []
    for text in texts:
        words = text.split()
        enc = loaded.tokenizer(words, is_split_into_words=True, truncation=True,
                               max_length=loaded.cfg.train.max_length, return_tensors="pt")
        logits = loaded.model(**enc.to(loaded.device)).logits[0, -enc["input_ids"].shape[1]:]
        first = {}
        for position, word in enumerate(enc.word_ids(0)):
            if word is not None and word not in first:
                first[word] = position
        tags = [loaded.labels[int(logits[first[w]].argmax())] for w in sorted(first)]
        out.append({"text": text, "tokens": words[: len(tags)], "tags": tags})
    return out


@torch.no_grad()
def translate(loaded: LoadedRun, sources: list[str], max_new_tokens: int = 64) -> list[dict]:
    """Seq2seq: the decoder's greedy output for each source text."""
    out = []
    for source in sources:
        ids = loaded.tokenizer(source, truncation=True, max_length=loaded.cfg.train.max_length,
                               return_tensors="pt")["input_ids"].to(loaded.device)
        gen = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens)
        out.append({"prompt": source, "response": loaded.tokenizer.decode(gen[0], skip_special_tokens=True).strip(),
                    "new_tokens": int((gen[0] != loaded.tokenizer.pad_token_id).sum())})
    return out


@torch.no_grad()
def generate(loaded: LoadedRun, prompts: list[str], max_new_tokens: int = 64) -> list[dict]:
    tok, cfg = loaded.tokenizer, loaded.cfg
    out = []
    for prompt in prompts:  # one at a time: no padding side effects on short CPU runs
        ids = torch.tensor([prompt_ids(tok, prompt, cfg.data.chat_template)], device=loaded.device)
        gen = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        new = gen[0, ids.shape[1]:]
        out.append({"prompt": prompt, "response": tok.decode(new, skip_special_tokens=True).strip(),
                    "new_tokens": len(new)})
    return out


def predict(loaded: LoadedRun, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
    task = loaded.cfg.task
    if task == "reward":
        raise RunError(f"{loaded.run.path}: a reward model scores a prompt and a response together; "
                       "use deltatune.inference.score(loaded, prompts, responses)")
    if task == "classification":
        return classify(loaded, texts)
    if task == "token_classification":
        return tag(loaded, texts)
    if task == "seq2seq":
        return translate(loaded, texts, max_new_tokens)
    return generate(loaded, texts, max_new_tokens)
