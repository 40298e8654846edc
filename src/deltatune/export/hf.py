"""Hugging Face folders: the merged model (``hf``: the delta folded into the base, loadable by plain
transformers with no peft and no added latency) and the delta alone (``delta``: the adapter folder peft
loads onto the base, MB-sized)."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from ..inference import RunParts, damaged_hint, on_device, tuned_model
from ..methods import registry
from ..rundir import check_safetensors
from ..errors import CannotMerge, RunError
from .formats import Format, register


@register
class MergedHF(Format):
    name, kind, folder = "hf", "merged", "merged"
    summary = "the delta folded into the base: a plain transformers model (no peft, no added latency)"
    runtime = "transformers"

    def write(self, parts: RunParts, out: Path, quantize: str | None) -> None:
        try:
            model = registry.get(parts.cfg.method.name).merge(tuned_model(parts))
        except CannotMerge as exc:
            raise CannotMerge(f"{exc}; export the delta instead (--format delta), which loads onto the base "
                              "with peft or deltatune") from exc
        model.save_pretrained(out, safe_serialization=True)
        parts.tokenizer.save_pretrained(out)

    def usage(self, out: Path, parts: RunParts, quantize: str | None) -> str:
        return (f"`deltatune predict {out} --text \"...\"`, or plain transformers: "
                f"`AutoModelFor...from_pretrained(\"{out}\")` with the head of the run's task.")

    def load(self, out: Path, manifest: dict, parts: RunParts) -> nn.Module:
        return on_device(parts.task.build_model(str(out)))


@register
class Delta(Format):
    name, kind, folder = "delta", "delta", "export"
    summary = "the delta alone (peft's adapter folder where peft has the method), with the run's tokenizer"

    def write(self, parts: RunParts, out: Path, quantize: str | None) -> None:
        run, hint = parts.run, damaged_hint(parts.run)
        if not run.delta.is_dir():
            raise RunError(f"{run.delta}: the run's delta folder is missing, there is nothing to export; {hint}")
        for file in sorted(run.delta.rglob("*.safetensors")):
            check_safetensors(file, hint)
        shutil.copytree(run.delta, out, dirs_exist_ok=True)
        shutil.copytree(run.tokenizer, out / "tokenizer")

    def usage(self, out: Path, parts: RunParts, quantize: str | None) -> str:
        return (f"`deltatune predict {out} --text \"...\"`, or with peft: "
                f"`PeftModel.from_pretrained(base_model, \"{out}\")` where the method is peft's.")

    def load(self, out: Path, manifest: dict, parts: RunParts) -> nn.Module:
        from ..inference import on_device

        return on_device(parts.method.load_delta(parts.build_base(), out, parts.cfg.method.options, parts.task))
