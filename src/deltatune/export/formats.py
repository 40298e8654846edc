"""What an export format is: one class per format, registered by name, like tasks and methods.

A format says whether a run can be written in it (``refuse``: why not, and what to use instead), writes
its files into a folder under construction (``write``), checks them with the runtime that will load
them (``check``: measured parity figures; an ``ExportError`` when they miss the format's thresholds)
and loads an export back for ``deltatune predict`` (``load``). Everything common to every export (the
run's config and labels beside the files, the model card, the manifest with file hashes, the commit
protocol) is done once by ``core.export``.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ExportError
from ..inference import RunParts


class Format:
    name: str = ""
    kind: str = ""  # export.json's "kind" (kept from the first version: "merged" for hf)
    summary: str = ""  # one line for --help and docs/export.md
    quantizations: tuple[str, ...] = ()  # --quantize values; the first is the default; () takes none
    folder: str = "export"  # the default --out, inside the run folder
    runtime: str = ""  # the package the check loads the export with

    def refuse(self, parts: RunParts) -> str | None:
        """Why this run cannot be exported in this format, and what to use instead; None when it can."""
        return None

    def quantization(self, asked: str | None) -> str | None:
        if not self.quantizations:
            if asked:
                raise ExportError(f"--quantize {asked}: the {self.name} format takes no --quantize")
            return None
        if asked is None:
            return self.quantizations[0]
        if asked not in self.quantizations:
            raise ExportError(f"--quantize {asked}: the {self.name} format takes one of "
                              f"{', '.join(self.quantizations)}")
        return asked

    def default_folder(self, quantize: str | None) -> str:
        return self.folder if quantize in (None, *self.quantizations[:1]) else f"{self.folder}-{quantize}"

    def write(self, parts: RunParts, out: Path, quantize: str | None) -> None:
        raise NotImplementedError

    def check(self, parts: RunParts, out: Path, quantize: str | None) -> dict | None:
        """Parity of the written files against the run, measured by the runtime that loads them."""
        return None

    def usage(self, out: Path, parts: RunParts, quantize: str | None) -> str:
        """How to load the export (at ``out``), for its model card."""
        return f"`deltatune predict {out} --text \"...\"` runs it as the run's task predicts."

    def load(self, out: Path, manifest: dict, parts: RunParts) -> nn.Module:
        """The exported model as ``task.predict`` calls it."""
        raise ExportError(f"{out}: deltatune cannot run a {self.name} export itself")


FORMATS: dict[str, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    FORMATS[cls.name] = cls()
    return cls


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ExportError(f"--format {name}: not a format; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]
