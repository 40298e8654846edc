"""GGUF exports for llama.cpp (and what runs on it: Ollama, LM Studio, llama-cpp-python).

- ``gguf``: the tuned model merged into the base, one GGUF file with its tokenizer and chat template, in
  f32 or f16 (written by ``gguf_file``) or quantized to q8_0 / q4_k_m by llama.cpp's own quantizer.
- ``gguf-lora``: a LoRA run's adapter alone, in llama.cpp's GGUF LoRA format, loaded onto the base model's
  f32 GGUF (built once into the cache, ``base_gguf``): MB instead of the base's size.

The check (``parity``) runs the export in llama.cpp and the run in transformers on the run's own prompts
and compares tokenization, greedy generations and logits (``THRESHOLDS``); ``deltatune predict`` runs the
export in llama.cpp through the run's task (``llamacpp.LlamaCppLM``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

from ..assets import resolve_model
from ..data.examples import prompt_ids, prompt_text
from ..errors import DataError, ExportError
from ..fs import cache_dir
from ..inference import RunParts, tuned_model
from . import gguf_file, llamacpp
from .formats import Format, register

CHECK_PROMPTS, CHECK_NEW_TOKENS = 20, 24
# Largest |logit difference| allowed between llama.cpp and the run in transformers (f32) at the generated
# positions, for files that must give the run's greedy tokens (f32, f16, base + gguf-lora). Measured
# (llamacpp.open_model keeps an f32 attention cache): f32 and gguf-lora 2e-4 on SmolLM2-135M and on the
# test Llama; f16 0.06-0.08 on SmolLM2-135M runs, 0.003 on the test Llama. A greedy generation may part
# from the run's only where the run led by less than this (``lead_lost``): a near-tie the file's rounding
# may break either way (seen once in 20 prompts of a SmolLM2 run in f16, never in f32).
LOGIT_TOLERANCE = {"f32": 0.01, "f16": 0.25}
# Quantized files: the share of generated positions where llama.cpp's top token, teacher-forced on the run's
# greedy tokens, is the run's token, counted where the run itself is decided: its token leads the runner-up
# by at least NEAR_TIE logits. Below that the run is close to indifferent and any change of arithmetic may
# pick the other token: on SmolLM2-135M 21% of generated positions are such near-ties, and every one of
# q8_0's disagreements was among them (largest lead 0.2). The agreement over all positions is reported too.
AGREEMENT = {"q8_0": 0.98, "q4_k_m": 0.90}
NEAR_TIE = 0.5
# When the run's data cannot be read any more (moved, deleted), the check prompts with these.
PACKAGED_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three prime numbers.", "How do I boil an egg?", "What is 12 times 7?", "Name a famous painter.",
    "Translate 'good morning' into Spanish.", "Why is the sky blue?", "Give me a synonym for happy.",
    "What does a CPU do?", "Summarize the plot of Cinderella.", "Suggest a name for a cat.",
    "How many legs does a spider have?", "What is the boiling point of water?", "Tell me a short joke.",
    "What is machine learning?", "Recommend a book for a long trip.", "How do plants drink water?",
    "Describe the color green to someone.",
]


def decoder_problem(parts: RunParts) -> str | None:
    """Why the run is not a Llama-family decoder that llama.cpp can run exactly; None when it is."""
    if parts.task.head != "causal" or not parts.task.generates:
        return (f"GGUF holds decoder language models; a {parts.cfg.task} run is not one: export it with "
                "--format hf (or --format delta)")
    return gguf_file.llama_problem(AutoConfig.from_pretrained(resolve_model(str(parts.cfg.model))), parts.tokenizer)


def eos_id(model: nn.Module, tokenizer) -> int:
    """The token transformers' ``generate`` stops at (the model's generation config), which the GGUF's
    end-of-sequence token must be for llama.cpp to stop at the same place."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return tokenizer.eos_token_id if eos is None else int(eos)


def model_file(quantize: str) -> str:
    return f"model-{quantize}.gguf"


@register
class Gguf(Format):
    name, kind, folder = "gguf", "gguf", "gguf"
    summary = "the delta merged into the base as one llama.cpp GGUF file (f16, f32, q8_0 or q4_k_m)"
    quantizations = ("f16", "f32", "q8_0", "q4_k_m")
    runtime = "llama.cpp"

    def refuse(self, parts: RunParts) -> str | None:
        if not parts.method.can_merge:
            return (f"{parts.cfg.method.name} cannot be merged into the base weights, and a GGUF model file holds "
                    "plain weights: export the delta with --format delta (a LoRA run's adapter alone goes to "
                    "llama.cpp with --format gguf-lora)")
        return decoder_problem(parts)

    def write(self, parts: RunParts, out: Path, quantize: str | None) -> None:
        model = parts.method.merge(tuned_model(parts))
        dtype = quantize if quantize in ("f32", "f16") else "f32"
        written = out / (model_file(dtype) if dtype == quantize else ".unquantized.gguf")
        gguf_file.write_model(model.state_dict(), model.config, parts.tokenizer, eos_id(model, parts.tokenizer),
                              written, dtype)
        if dtype != quantize:
            llamacpp.quantize(written, out / model_file(quantize), quantize)
            written.unlink()
        shutil.copytree(parts.run.tokenizer, out / "tokenizer")

    def check(self, parts: RunParts, out: Path, quantize: str | None) -> dict:
        return parity(parts, out / model_file(quantize), None, quantize)

    def usage(self, out: Path, parts: RunParts, quantize: str | None) -> str:
        return (f"llama.cpp: `llama-cli -m {out / model_file(quantize)}` (the chat template is in the file), or in "
                "Python `llama_cpp.Llama(model_path=...)`; "
                f"`deltatune predict {out} --text \"...\"` runs it in llama.cpp as the run's task predicts.")

    def load(self, out: Path, manifest: dict, parts: RunParts) -> nn.Module:
        llm = llamacpp.open_model(out / model_file(manifest["quantize"]))
        return llamacpp.LlamaCppLM(llm, llm.token_eos())


@register
class GgufLora(Format):
    name, kind, folder = "gguf-lora", "gguf-lora", "gguf-lora"
    summary = "a LoRA run's adapter alone as a llama.cpp GGUF LoRA adapter, loaded onto the base model's GGUF"
    runtime = "llama.cpp"

    def refuse(self, parts: RunParts) -> str | None:
        try:
            settings = json.loads((parts.run.delta / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            settings = {}
        if settings.get("peft_type") != "LORA":
            return (f"llama.cpp's adapters are LoRA adapters and this run's delta ({parts.cfg.method.name}) is not "
                    "one: export the merged model with --format gguf, or the delta with --format delta")
        if parts.method.quantized_base:
            return ("the adapter was trained on a 4-bit base and fits that base, not the base model's full-precision "
                    "GGUF: export the merged model with --format gguf")
        return decoder_problem(parts)

    def write(self, parts: RunParts, out: Path, quantize: str | None) -> None:
        config = AutoConfig.from_pretrained(resolve_model(str(parts.cfg.model)))
        gguf_file.write_lora(parts.run.delta, config, out / "adapter.gguf")
        shutil.copytree(parts.run.tokenizer, out / "tokenizer")
        base_gguf(parts)  # now, so that the model card can point at it

    def check(self, parts: RunParts, out: Path, quantize: str | None) -> dict:
        return parity(parts, base_gguf(parts), out / "adapter.gguf", "f32")

    def usage(self, out: Path, parts: RunParts, quantize: str | None) -> str:
        return (f"llama.cpp loads the adapter onto the base model as an f32 GGUF (not merged): `llama-cli -m BASE.gguf "
                f"--lora {out / 'adapter.gguf'}`, or `llama_cpp.Llama(model_path=BASE.gguf, lora_path=...)`. On this "
                f"machine BASE.gguf is `{base_gguf_path(parts)}` (built by deltatune from `{parts.cfg.model}`); "
                "elsewhere `deltatune predict` on this export builds it again, or llama.cpp's "
                f"`convert_hf_to_gguf.py --outtype f32` makes it from the base model folder. "
                f"`deltatune predict {out} --text \"...\"` runs base + adapter in llama.cpp as the run's task predicts.")

    def load(self, out: Path, manifest: dict, parts: RunParts) -> nn.Module:
        llm = llamacpp.open_model(base_gguf(parts), lora=out / "adapter.gguf")
        return llamacpp.LlamaCppLM(llm, llm.token_eos())


def base_gguf_path(parts: RunParts) -> Path:
    """Where the base model's f32 GGUF lives in the cache, named by the contents of the base model folder and
    the run's tokenizer (what it is made of), so a changed base is never mistaken for the old one."""
    digest = hashlib.sha256()
    for folder in (resolve_model(str(parts.cfg.model)), parts.run.tokenizer):
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return cache_dir() / "gguf" / f"base-{digest.hexdigest()[:24]}-f32.gguf"


def base_gguf(parts: RunParts) -> Path:
    """The base model (no delta) as an f32 GGUF, the one a gguf-lora adapter is loaded onto; built once."""
    path = base_gguf_path(parts)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    base = parts.task.build_model(parts.cfg.model).eval()
    try:
        gguf_file.write_model(base.state_dict(), base.config, parts.tokenizer, eos_id(base, parts.tokenizer),
                              partial, "f32")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_prompts(parts: RunParts) -> tuple[list[str], str]:
    """The run's own prompts (its eval split first, then its training rows) and where they came from; the
    packaged prompts when the run's data can no longer be read."""
    try:
        rows = parts.task.rows(None)
    except (DataError, OSError):
        return PACKAGED_PROMPTS[:CHECK_PROMPTS], "packaged prompts (the run's data could not be read)"
    column = rows.fields.inputs[0]
    prompts = list(dict.fromkeys(r[column] for split in ("eval", "train") for r in rows.splits[split]
                                 if isinstance(r.get(column), str) and r[column].strip()))
    fits = [p for p in prompts if len(prompt_ids(parts.tokenizer, p, parts.cfg.data.chat_template))
            <= parts.cfg.train.max_length]
    return fits[:CHECK_PROMPTS], "the run's eval split, then its training rows"


@torch.no_grad()
def reference(parts: RunParts, prompts: list[str]) -> list[tuple[list[int], list[int], np.ndarray]]:
    """Per prompt, from the run in transformers: its token ids, the greedy tokens ``generate`` gives (as
    ``tasks.causal_lm`` calls it) and the logits at the positions that predict them."""
    model, tok = tuned_model(parts), parts.tokenizer
    out = []
    for prompt in prompts:
        ids = prompt_ids(tok, prompt, parts.cfg.data.chat_template)
        x = torch.tensor([ids])
        new = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=CHECK_NEW_TOKENS, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        scores = model(input_ids=torch.tensor([ids + new])).logits[0, len(ids) - 1:-1].float().numpy()
        out.append((ids, new, scores))
    return out


def parity(parts: RunParts, model: Path, lora: Path | None, quantize: str) -> dict:
    """llama.cpp against transformers on the run's prompts: tokenization of the prompt text, greedy
    generations, and at the generated positions (teacher-forced on the run's greedy tokens) the logits and
    the top-1 agreement. An ``ExportError`` with the figures when they miss ``LOGIT_TOLERANCE`` (f32, f16,
    gguf-lora: greedy tokens equal too) or ``AGREEMENT`` (quantized files)."""
    prompts, source = check_prompts(parts)
    expected = reference(parts, prompts)
    longest = max(len(ids) + len(new) for ids, new, _ in expected) + 1
    llm = llamacpp.open_model(model, lora, n_ctx=max(longest, CHECK_NEW_TOKENS + 64), logits_all=True)
    same_tokens = same_greedy = 0
    agree, decided, overturned, worst = [], [], [], 0.0
    try:
        for prompt, (ids, new, scores) in zip(prompts, expected):
            text = prompt_text(parts.tokenizer, prompt, parts.cfg.data.chat_template)
            same_tokens += llm.tokenize(text.encode(), add_bos=False, special=True) == \
                parts.tokenizer(text, add_special_tokens=False)["input_ids"]
            mine = llamacpp.greedy(llm, ids, CHECK_NEW_TOKENS, llm.token_eos())
            same_greedy += mine == new
            if mine != new:
                overturned.append(lead_lost(mine, new, scores))
            got = llamacpp.logits(llm, ids + new)[len(ids) - 1:-1]
            agree += list(got.argmax(-1) == np.array(new))
            top2 = np.sort(scores, axis=-1)[:, -2:]
            decided += list(top2[:, 1] - top2[:, 0] >= NEAR_TIE)
            worst = max(worst, float(np.abs(got - scores).max()))
    finally:
        llm.close()
    agree, decided = np.array(agree), np.array(decided)
    n = len(prompts)
    figures = {"runtime": f"llama.cpp (llama-cpp-python {version('llama_cpp_python')})",
               "prompts": f"{n} from {source}, {CHECK_NEW_TOKENS} new tokens at most",
               "tokenization_equal": f"{same_tokens}/{n}", "greedy_equal": f"{same_greedy}/{n}",
               "max_logit_diff": float(f"{worst:.3g}"), "top1_agreement": round(float(agree.mean()), 4),
               "positions": len(agree),
               "top1_agreement_decided": round(float(agree[decided].mean()), 4) if decided.any() else 1.0,
               "near_ties": int((~decided).sum())}
    if overturned:
        figures["greedy_largest_lead_overturned"] = float(f"{max(overturned):.3g}")
    failed = [f"tokenization of {n - same_tokens} of {n} prompts differs"] if same_tokens < n else []
    if quantize in AGREEMENT:
        figures["top1_agreement_decided_min"] = AGREEMENT[quantize]
        if figures["top1_agreement_decided"] < AGREEMENT[quantize]:
            failed.append(f"top-1 agreement {figures['top1_agreement_decided']} < {AGREEMENT[quantize]}")
    else:
        figures["max_logit_diff_allowed"] = LOGIT_TOLERANCE[quantize]
        beyond = [lead for lead in overturned if lead > LOGIT_TOLERANCE[quantize]]
        if beyond:
            failed.append(f"greedy generations of {len(beyond)} of {n} prompts part from the run's where it "
                          f"led by more than {LOGIT_TOLERANCE[quantize]} logits")
        if worst > LOGIT_TOLERANCE[quantize]:
            failed.append(f"largest logit difference {worst:.3g} > {LOGIT_TOLERANCE[quantize]}")
    if failed:
        raise ExportError(f"{model.name}{' + ' + lora.name if lora else ''} in llama.cpp does not give the run's "
                          f"answers ({'; '.join(failed)}; figures: {figures}); nothing was written. Report it with "
                          "these figures, or export with --format hf")
    return figures


def lead_lost(mine: list[int], new: list[int], scores: np.ndarray) -> float:
    """Where llama.cpp's greedy tokens ``mine`` first part from the run's ``new``: by how many logits the run
    preferred its own token there (its logits ``scores`` apply: the tokens before are the same). A split
    inside the file's logit tolerance is a near-tie that the file's rounding may break either way."""
    split = next((i for i, (a, b) in enumerate(zip(mine, new)) if a != b), None)
    if split is None:  # one is a prefix of the other: the same stop rules cannot give that, so it fails
        return float("inf")
    return float(scores[split, new[split]] - scores[split, mine[split]])
