"""ONNX for onnxruntime: an encoder run's forward pass (classification, token classification; feature
extraction's encoder + pooling + head) as one graph, ``model.onnx``, with the tokenizer beside it.

The model is merged first where the method can (no adapter cost at run time); a method whose unmerged
model is still plain torch layers (``Method.traceable``) is exported as it is. torch's dynamo exporter
(``torch.onnx.export(dynamo=True)``) writes the graph: on transformers 5 BERT the TorchScript tracer
bakes the example's sequence length into the attention mask and gives wrong logits at any other
length, while the dynamo graph keeps batch and sequence symbolic. ``int8`` is onnxruntime's dynamic
quantization of that fp32 graph (int8 weights, activations quantized per call; see ``quantize_int8``
for which layers).

The check runs the run's own PyTorch model and onnxruntime on the run's evaluation split and compares
class probabilities (fp32: within ``FP32_TOLERANCE``; int8: argmax agreement at least ``INT8_AGREEMENT``).
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import ExportError
from ..inference import RunParts, tuned_model
from ..methods import registry as methods
from .eval_inputs import check_inputs
from .formats import FORMATS, Format, register

OPSET = 18  # onnxruntime >= 1.14 runs it; pinned so an export does not change with torch's default
FP32_TOLERANCE = 1e-4  # max |p_onnxruntime - p_pytorch| over every class probability
INT8_AGREEMENT = 0.99  # share of texts (tokens, for token classification) with the same top class
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the graph takes those its model's forward takes
FILE = "model.onnx"


@register
class Onnx(Format):
    name, kind, folder = "onnx", "onnx", "onnx"
    summary = "an encoder run as one ONNX graph for onnxruntime (fp32, or int8 weights), tokenizer beside it"
    quantizations = ("fp32", "int8")
    runtime = "onnxruntime"

    def refuse(self, parts: RunParts) -> str | None:
        others = ", ".join(f for f in FORMATS if f != self.name)
        if not parts.task.predicts_from_logits:
            return (f"task {parts.cfg.task} does not predict from one forward pass's logits (the ONNX graph is the "
                    "forward pass of an encoder: classification, token_classification); export it as one of "
                    f"{others}")
        method = parts.method
        if not (method.can_merge or method.traceable):
            mergeable = ", ".join(m for m in methods.names() if methods.get(m).can_merge)
            return (f"method {method.name}: its delta can neither be merged into the base nor traced as plain layers "
                    f"(it adds inputs to the model); export it as --format delta (base + delta, run by deltatune or "
                    f"peft), or train a method that merges ({mergeable}) for an ONNX export")
        return None

    def write(self, parts: RunParts, out: Path, quantize: str | None) -> None:
        model = graph_model(parts)
        if quantize == "int8":
            with tempfile.TemporaryDirectory() as tmp:
                fp32 = Path(tmp) / FILE
                export_graph(model, fp32, parts)
                quantize_int8(fp32, out / FILE, getattr(model.config, "intermediate_size", None))
        else:
            export_graph(model, out / FILE, parts)
        parts.tokenizer.save_pretrained(out)

    def check(self, parts: RunParts, out: Path, quantize: str | None) -> dict:
        ids, source = check_inputs(parts)
        onnx_model = OnnxModel(out / FILE)
        reference = tuned_model(parts)
        diff, same, units = 0.0, 0, 0
        for batch in padded_batches(parts.tokenizer, ids):
            want, got = (real_probabilities(m, batch) for m in (reference, onnx_model))
            diff = max(diff, float((want - got).abs().max()))
            same += int((want.argmax(-1) == got.argmax(-1)).sum())
            units += len(want)
        figures = {"runtime": f"onnxruntime {onnx_model.version}", "inputs": source,
                   "compared": f"{units} {'texts' if parts.task.one_label_per_text else 'tokens'}",
                   "max_abs_probability_difference": diff, "argmax_agreement": same / units}
        if quantize == "int8" and same / units < INT8_AGREEMENT:
            raise ExportError(f"{out / FILE}: int8 onnxruntime picks the run's top class for only {same / units:.4f} "
                              f"of {figures['compared']} (needs {INT8_AGREEMENT}; max probability difference "
                              f"{diff:.3g}); int8 flips the texts a model is unsure of, so export --quantize fp32, which keeps "
                              "the run's answers, or train the run further")
        if quantize != "int8" and diff > FP32_TOLERANCE:
            raise ExportError(f"{out / FILE}: onnxruntime's class probabilities differ from the run's by up to "
                              f"{diff:.3g} (allowed {FP32_TOLERANCE}) on {figures['compared']}; the graph does not "
                              "compute the run's model: report it with the run's config.yaml")
        return figures

    def usage(self, out: Path, parts: RunParts, quantize: str | None) -> str:
        return (f"`deltatune predict {out} --text \"...\"` runs it in onnxruntime, or plain onnxruntime:\n\n"
                "```python\nimport onnxruntime, numpy as np\nfrom transformers import AutoTokenizer\n"
                f"tok = AutoTokenizer.from_pretrained(\"{out}\")\n"
                f"session = onnxruntime.InferenceSession(\"{out / FILE}\", providers=[\"CPUExecutionProvider\"])\n"
                "names = [i.name for i in session.get_inputs()]\n"
                "enc = tok([\"a text\"], padding=True, return_tensors=\"np\")\n"
                "feed = {n: enc.get(n, np.zeros_like(enc[\"input_ids\"])).astype(np.int64) for n in names}\n"
                "logits = session.run([\"logits\"], feed)[0]\n```\n\n"
                "`labels.json` names the logits' classes in order.")

    def load(self, out: Path, manifest: dict, parts: RunParts) -> nn.Module:
        return OnnxModel(out / FILE)


def graph_model(parts: RunParts) -> nn.Module:
    """The run's model as one plain module: merged where the method can, else as tuned (``traceable``)."""
    model = tuned_model(parts)
    if parts.method.can_merge:
        model = parts.method.merge(model)
    return model.cpu().float().eval()


class Logits(nn.Module):
    """The model's forward from positional token tensors to the logits alone: what the graph computes."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The token inputs the model's forward takes (BERT: token_type_ids too; feature extraction: not)."""
    taken = inspect.signature(model.forward).parameters
    return tuple(n for n in INPUTS if n in taken)


def export_graph(model: nn.Module, path: Path, parts: RunParts) -> None:
    """Dynamo export with symbolic batch and sequence axes, from a padded example batch of 2 x 8 (sizes
    of 0 or 1 would be specialised as constants)."""
    names = input_names(model)
    ids = torch.randint(0, len(parts.tokenizer), (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = tuple({0: batch, 1: sequence} for _ in names)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(Logits(model, names), tuple(example[n] for n in names), str(path), dynamo=True,
                              opset_version=OPSET, input_names=list(names), output_names=["logits"],
                              dynamic_shapes=(shapes,), external_data=False, verbose=False)
    except Exception as exc:  # the exporter wraps torch's own error types; the innermost says what failed
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        said = str(root).strip().splitlines()
        raise ExportError(f"{parts.run.path}: torch's ONNX exporter cannot trace {type(model).__name__} "
                          f"({type(root).__name__}{': ' + said[0] if said else ''}); export it as --format hf "
                          "instead") from exc


def quantize_int8(fp32: Path, out: Path, intermediate_size: int | None) -> None:
    """onnxruntime's dynamic quantization: int8 weights (a scale per output channel), activations quantized
    per call, for the MatMuls of attention and of the feed-forward's first layer. The feed-forward's
    second layer (its input is ``intermediate_size`` wide) reads the activation outliers BERT-like encoders
    are known for (Bondarenko et al., 2021) and stays fp32, as do the embeddings and the head: on MiniLM
    (benchmarks/export_onnx.py) quantizing every MatMul per tensor kept the run's top class on 96.6% of
    the eval texts, this on 99.6%. (The quantizer's optional pre-processing fails on dynamo graphs.)"""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32), load_external_data=False).graph
    widths = {w.name: w.dims[0] for w in graph.initializer if len(w.dims) == 2}
    second = [n.name for n in graph.node if n.op_type == "MatMul" and widths.get(n.input[1]) == intermediate_size]
    with quiet():
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=second)


@contextmanager
def quiet():
    """Without the exporter's and quantizer's log lines and warnings (torchvision ops it skips, axis names
    it renames, advice to pre-process): the export's own output is the folder and its check."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


class OnnxModel(nn.Module):
    """An ``onnxruntime.InferenceSession`` behind the call the tasks make, ``model(input_ids=...,
    attention_mask=...).logits``, so ``task.predict`` tokenizes and labels as it does for the run."""

    def __init__(self, path: Path):
        import onnxruntime

        super().__init__()
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.version = onnxruntime.__version__
        # Tasks ask the model's device from its first parameter: an empty one says "cpu", where the
        # session's inputs and outputs live.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> SimpleNamespace:
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": torch.zeros_like(input_ids)}  # what BERT assumes when the task passes none
        feed = {n: given[n].cpu().numpy().astype("int64") for n in self.names}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))


def padded_batches(tokenizer, ids: list[list[int]], size: int = 32):
    """Batches of similar lengths (less padding), padded as ``predict`` pads."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), size):
        yield tokenizer.pad({"input_ids": [ids[i] for i in order[start:start + size]]}, return_tensors="pt")


@torch.no_grad()
def real_probabilities(model: nn.Module, batch) -> torch.Tensor:
    """Class probabilities per text, or per real (unpadded) token for token logits: ``(units, classes)``."""
    probs = torch.softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                          .float().cpu(), -1)
    return probs[batch["attention_mask"].bool()] if probs.dim() == 3 else probs
