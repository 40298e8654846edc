"""LoRA (Hu et al., 2021) via peft: ``W x + (alpha / r) * B A x`` with rank-r ``A``, ``B``; ``B = 0`` at init.

Saved in peft's own format, so ``peft.PeftModel.from_pretrained(base, run_dir / "delta")``
loads our adapters; ``merge`` folds ``(alpha / r) * B A`` into ``W`` (no added latency).

Variants, all peft's (docs/methods.md, "LoRA variants"):

- DoRA (Liu et al., 2024), ``use_dora``: ``W' = m * (W + s B A) / ||W + s B A||`` (norm per output row),
  with the magnitude ``m`` trained too: ``out_features`` more parameters per adapted layer.
- rsLoRA (Kalajdzievski, 2023), ``use_rslora``: ``s = alpha / sqrt(r)`` instead of ``alpha / r``.
- PiSSA (Meng et al., 2024) and OLoRA (Buyukakyuz, 2024), ``init``: ``B0 A0`` starts as ``W``'s top-r
  singular directions (PiSSA) or the first r columns of its QR decomposition (OLoRA), and the frozen
  base becomes the residual ``W - s B0 A0``, so the model is unchanged at init. A saved delta is
  converted to a plain LoRA adapter on the untouched ``W`` (``as_plain_lora``).
- LoRA+ (Hayou et al., 2024), ``loraplus_lr_ratio``: every ``B`` trains at train.lr times the ratio
  (``lr_scale``; train/loop.py builds the optimizer's groups from it).
- EVA (Paischer et al., 2024, "One initialization to rule them all"), ``init: eva``: before the first step,
  each ``A`` becomes the top principal directions (right-singular vectors) of its layer's centred inputs over
  the first ``eva_batches`` training batches (padding left out by the attention mask; peft's incremental SVD,
  passed over them again until the components settle), ``B = 0``, and the ranks are moved to the layers whose
  inputs those directions explain best: the same total, ``r`` times the number of layers, at most
  ``eva_rho * r`` each (a layer may get 0 and is then not adapted), ``alpha`` scaled with each rank. The model
  is unchanged at start.
  ``data_start`` computes it (``peft.get_eva_state_dict``), ``set_start`` puts it in place
  (``peft.initialize_lora_eva_weights``); the run keeps the A's, so a resumed run rebuilds the same ranks
  (train/data_start.py). The saved adapter carries the ranks as peft's ``rank_pattern``/``alpha_pattern``.
- LoftQ (Li et al., 2023), ``init: loftq``, qlora only: ``s B A`` starts as the truncated SVD of the 4-bit
  base's quantization error (``qlora.loftq_start``).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import doc
from ..errors import ConfigError, RunError
from ..lazy import lazy
from .peft_common import PeftMethod, adapter_problems, head_modules, task_type
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")
peft = lazy("peft")
safetensors_torch = lazy("safetensors.torch")

# method.init -> peft's init_lora_weights.
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "eva": "eva",
         "loftq": True}  # qlora only: peft's default start, then its B A set to the quantization error (qlora.py)
# Inits that move part of W into B0 A0 and leave the residual as the frozen base.
CHANGES_BASE = ("pissa", "olora")
# EVA passes over its batches again until every needed component settles (peft has no limit): a run that has
# not settled after this many passes stops, saying what to do.
EVA_PASSES = 50
# `deltatune merge-deltas --how` -> peft's add_weighted_adapter combination: each on the full updates
# s B A of every layer (the "_svd" variants: weighted sum, TIES, DARE, then the best rank-r factors of the
# result), or their factors side by side (cat: exact, rank the sum of the ranks). peft's plain linear / ties /
# dare_linear combine A and B separately, which its own docs call a very rough approximation.
COMBINE = {"linear": "svd", "ties": "ties_svd", "dare": "dare_linear_svd", "cat": "cat"}
# On a model whose base was changed at init: its B0 and A0, keyed as peft saves them. Kept in memory only: a
# resumed run applies the method again, and the SVD or QR of the same weights gives the same start (on the
# same machine and library versions, as bit-exact resuming assumes anyway).
START = "deltatune_initial_factors"


@dataclass
class LoraOptions:
    r: int = doc(8, "Rank of the update B A.")
    alpha: float = doc(16.0, "Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = doc(0.05, "Dropout on the LoRA branch's input.")
    target_modules: list[str] | None = doc(None, "Linear layers to adapt by name (e.g. [q_proj, v_proj]); "
                                                 "default: peft's choice for the architecture.")
    use_dora: bool = doc(False, "DoRA (Liu et al. 2024): each adapted weight is a trained magnitude per output row "
                                "times the direction of W + s B A (out_features more parameters per layer; every "
                                "forward forms W + s B A for its norm). Merges.")
    use_rslora: bool = doc(False, "rsLoRA (Kalajdzievski 2023): scale the update by alpha / sqrt(r) instead of "
                                  "alpha / r, so that large ranks still learn. No extra parameters.")
    init: str = doc("default", "How B A starts. default: A Kaiming-uniform, B = 0; gaussian: A normal with std 1/r, "
                               "B = 0; pissa (Meng et al. 2024): W's top-r singular directions; olora (Buyukakyuz "
                               "2024): the first r columns of W's QR decomposition. pissa and olora leave the residual "
                               "as the frozen base (the model is unchanged at start; not with qlora's 4-bit base); the "
                               "saved delta is a plain LoRA of rank 2r on the untouched base. eva (Paischer et al. "
                               "2024): before the first step, each A from an SVD of its layer's inputs over the first "
                               "eva_batches training batches (padding left out), B = 0, and the ranks moved to the "
                               "layers whose inputs that explains best (the total r x layers kept, at most eva_rho x "
                               "r each); the run keeps them, so a resume rebuilds them. loftq (Li et al. 2023; qlora "
                               "only): B A starts as the best rank-r approximation of the base's 4-bit quantization "
                               "error (original weights - dequantized ones, from the model's safetensors), so the "
                               "quantized model starts closer to the original.")
    loraplus_lr_ratio: float | None = doc(None, "LoRA+ (Hayou et al. 2024): every B trains at train.lr times this "
                                                "ratio (the paper suggests about 16), A and the head at train.lr. "
                                                "Unset: one rate for all.")
    eva_rho: float = doc(2.0, "init: eva: the most rank one layer may get, as a multiple of r (peft's rho, at least 1; "
                              "1 keeps r everywhere: EVA's A without moving ranks).")
    eva_batches: int = doc(8, "init: eva: how many of the first training batches (train.batch_size rows each) the "
                              "SVD reads; it passes over them again until its components settle. Each needs at "
                              "least eva_rho x r real tokens.")

    quantized_base = False  # qlora's options say True: init loftq needs a quantized base

    def problems(self) -> list[str]:
        out = adapter_problems(self)
        if self.init not in INITS:
            out.append(f"init: use {', '.join(INITS)}, got {self.init!r}")
        elif self.init == "loftq" and not self.quantized_base:
            out.append("init: loftq fits B A to the error of a 4-bit quantized base, and lora's base is not "
                       "quantized: use method.name=qlora with init loftq, or another init")
        if not (self.eva_rho >= 1 and math.isfinite(self.eva_rho)):
            out.append(f"eva_rho: must be a number of at least 1 (the most rank a layer may get under init: eva, as "
                       f"a multiple of r), got {self.eva_rho}; 1 keeps r for every layer")
        if self.eva_batches < 1:
            out.append(f"eva_batches: must be at least 1 (training batches init: eva reads), got {self.eva_batches}")
        ratio = self.loraplus_lr_ratio
        if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
            out.append(f"loraplus_lr_ratio: must be a positive number (B trains at train.lr times it; Hayou et al. "
                       f"suggest about 16), got {ratio}; leave it unset for one rate")
        return out


@register
class Lora(PeftMethod):
    name = "lora"
    can_merge = True
    summary = "low-rank updates B A on chosen linear layers (peft)"
    Options = LoraOptions
    default_lr = 5e-4  # Hu et al. 2021, RoBERTa-base GLUE: 4e-4..5e-4 (an order of magnitude above full fine-tuning)
    default_lr_source = ("Hu et al. 2021 (LoRA), RoBERTa-base on GLUE: 4e-4 to 5e-4, an order of magnitude above "
                         "full fine-tuning's 2e-5, as later LoRA recipes also find")

    combinations = tuple(COMBINE)

    def search_space(self) -> dict:
        return {"r": [4, 8, 16, 32], "alpha": [8, 16, 32, 64], "dropout": [0.0, 0.05, 0.1]}

    def combine_problems(self, delta: Path) -> list[str]:
        config = json.loads((Path(delta) / "adapter_config.json").read_text())
        if config.get("use_dora"):
            return ["it is a DoRA delta (method.use_dora): peft combines the low-rank factors B A, not DoRA's "
                    "trained magnitudes; combine plain LoRA runs"]
        return []

    def combine(self, base: nn.Module, deltas: list[Path], weights: list[float], how: str, density: float,
                rank: int | None) -> tuple[dict[str, Tensor], dict]:
        """peft's ``add_weighted_adapter`` over the deltas' LoRA factors, loaded as adapters of one model
        without their heads (peft refuses two adapters that each save a head)."""
        names = [f"delta{i}" for i in range(len(deltas))]
        model = None
        for name, folder in zip(names, deltas):
            config = peft.LoraConfig.from_pretrained(str(folder))
            config.task_type, config.modules_to_save, config.inference_mode = None, None, False
            config.base_model_name_or_path = getattr(base, "name_or_path", None)  # the name saved, here the path
            if model is None:
                model = peft.get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            state = {k: v for k, v in safetensors_torch.load_file(Path(folder) / "adapter_model.safetensors").items()
                     if _factor(k)}
            loaded = peft.set_peft_model_state_dict(model, state, adapter_name=name)
            if loaded.unexpected_keys:
                raise ValueError(f"{folder}: {len(loaded.unexpected_keys)} tensors match no layer of the base, e.g. "
                                 f"{loaded.unexpected_keys[0]}")
        model.add_weighted_adapter(names, weights, "combined", combination_type=COMBINE[how],
                                   density=None if how in ("linear", "cat") else density, svd_rank=rank)
        config = model.peft_config["combined"].to_dict()
        config["target_modules"] = sorted(config["target_modules"])
        config["use_rslora"] = False  # the factors carry the whole update: scale alpha / r = 1, as peft sets
        state = peft.get_peft_model_state_dict(model, adapter_name="combined")
        return {k: v.contiguous() for k, v in state.items()}, config

    def peft_config(self, options: LoraOptions, task, model: nn.Module) -> peft.LoraConfig:
        return peft.LoraConfig(task_type=task_type(task), r=options.r, lora_alpha=options.alpha,
                               lora_dropout=options.dropout, target_modules=options.target_modules,
                               modules_to_save=head_modules(task, model), use_dora=options.use_dora,
                               use_rslora=options.use_rslora, init_lora_weights=INITS[options.init],
                               # The batches give peft the model's inputs alone: the padding is left out by their
                               # attention mask, not by labels (a classifier's are one per row).
                               eva_config=peft.EvaConfig(rho=options.eva_rho, use_label_mask=False)
                               if options.init == "eva" else None)

    def apply(self, model: nn.Module, options: LoraOptions, task) -> nn.Module:
        problems = _own_loop_problems(options, task)
        if problems:
            raise ConfigError(problems)
        with warnings.catch_warnings():  # peft's advice for GPUs; on the CPU the pass reads batches in place
            warnings.filterwarnings("ignore", "lora with eva initialization used with low_cpu_mem_usage")
            adapted = super().apply(model, options, task)
        if options.init in CHANGES_BASE:
            state = peft.get_peft_model_state_dict(adapted)
            setattr(adapted, START, {k: v.detach().clone() for k, v in state.items() if _factor(k)})
        return adapted

    def save_delta(self, model: nn.Module, path: Path, options, state: dict | None = None) -> None:
        super().save_delta(model, path, options, state)
        start = getattr(model, START, None)
        if start is not None:
            as_plain_lora(Path(path), start)

    def start_batches(self, options: LoraOptions) -> int:
        return options.eva_batches if options.init == "eva" else 0

    def data_start(self, model: nn.Module, options: LoraOptions, batches: list[dict]) -> dict[str, Tensor]:
        """EVA's A for every adapted layer (its rank the number of rows) from the batches' inputs (peft's
        ``get_eva_state_dict``: padding left out by the attention mask, the adapters switched off). Computed in
        one process from the batches it is given (no gathering between processes)."""
        inputs = [batch["inputs"] for batch in batches]
        limit, done = EVA_PASSES * len(inputs), []

        def forward(model: nn.Module, batch: dict):
            if len(done) > limit:
                raise RunError(f"method.init: eva: the SVD of the layers' inputs did not settle after {EVA_PASSES} "
                               f"passes over {len(inputs)} batch(es). peft skips a batch with fewer inputs to a layer "
                               f"than the {round(options.r * options.eva_rho)} components it needs (method.r x "
                               "method.eva_rho): real tokens, or rows for a layer that reads one vector per row (BERT's "
                               "pooler, matched by 'dense'). Raise train.batch_size or method.eva_batches, lower "
                               "method.eva_rho, or use another method.init")
            done.append(1)
            # Packed rows (position ids, no attention mask) without a KV cache, which would let the packed examples
            # see each other (as tasks/common.py's forward); their padding, at the end of the rows, is read too.
            return model(**batch, use_cache=False) if "position_ids" in batch else model(**batch)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            state = peft.get_eva_state_dict(model, inputs, forward_fn=forward, prepare_model_inputs_fn=_real_positions,
                                            prepare_layer_inputs_fn=_layer_inputs, gather_distributed_inputs=False,
                                            show_progress_bar=False)
        return {name: a.detach().cpu().contiguous() for name, a in state.items()}

    def set_start(self, model: nn.Module, options: LoraOptions, state: dict[str, Tensor]) -> None:
        """Each layer at its EVA rank (0: no longer adapted) with its A, B = 0; peft records the ranks and the
        scaled alphas in the config (``rank_pattern``, ``alpha_pattern``), so the saved adapter has them."""
        peft.initialize_lora_eva_weights(model, eva_state_dict=dict(state), show_progress_bar=False)

    def lr_scale(self, name: str, options: LoraOptions) -> float:
        ratio = options.loraplus_lr_ratio
        return ratio if ratio is not None and (".lora_B." in name or ".lora_embedding_B." in name) else 1.0


def _own_loop_problems(options: LoraOptions, task) -> list[str]:
    """What a task whose reference is the delta switched off, whose own loop trains at one rate (PPO) or reads
    no batches before it (EVA), or an encoder-decoder (EVA), cannot do with these options."""
    out = []
    if options.init in CHANGES_BASE and task.reference_is_delta_off:
        out.append(f"method.init: {options.init} changes the base weights (the frozen part becomes W - B0 A0), so "
                   f"the adapter switched off is no longer the base model that {task.name}'s reference must be; "
                   "use method.init=default or gaussian")
    if options.init == "eva" and task.loop != "examples":
        out.append(f"method.init: eva reads the training batches before the first step of deltatune's loop, and "
                   f"{task.name} samples its data in a loop of its own; use method.init=default or gaussian")
    elif options.init == "eva" and task.head == "seq2seq":
        out.append(f"method.init: eva leaves the padding out by the inputs' attention mask, which does not describe "
                   f"what {task.name}'s decoder layers read (the targets, or the encoder's states of another "
                   "length); use method.init=default or gaussian")
    if options.loraplus_lr_ratio is not None and task.one_learning_rate:
        out.append(f"method.loraplus_lr_ratio: {task.name} trains in its own loop, whose optimizer has one rate for all "
                   "parameters; leave it unset")
    return out


def _real_positions(inputs: dict, config) -> Tensor:
    """EVA's mask of a batch: its real tokens (rows, positions), from the attention mask; all of them without
    one (packed rows). peft's default gives the same positions, as indices, which fit only 3-D layer inputs."""
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def _layer_inputs(layer_input, mask: Tensor, name: str) -> Tensor:
    """What EVA's SVD reads of a layer's input: one row per real token (padding left out) for a layer that reads
    every position, or the input as it is for one that reads a vector per row (BERT's pooler)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if x.ndim == 2 and len(x) == len(mask):
        return x.contiguous()  # peft hashes it with view(-1); BERT's pooler reads a slice
    raise RunError(f"method.init: eva: layer {name} reads inputs of shape {tuple(x.shape)}, which match neither the "
                   f"batch's tokens {tuple(mask.shape)} nor one vector per row; leave it out of method.target_modules "
                   "or use another method.init")


def _factor(key: str) -> str | None:
    """"A" or "B" for a LoRA factor's key in a saved adapter (``...query.lora_A.weight``), else None."""
    for side in "AB":
        if f".lora_{side}." in key or f".lora_embedding_{side}" in key:
            return side
    return None


def as_plain_lora(path: Path, start: dict[str, Tensor]) -> None:
    """Rewrite the adapter saved in ``path`` (B, A trained on the residual base ``W - s B0 A0`` that PiSSA and
    OLoRA leave) as a plain LoRA adapter on the untouched base ``W``:

        W - s B0 A0 + s B A = W + s [B | -B0] [A ; A0]

    rank 2r at the same scale ``s`` (alpha doubled, or times sqrt(2) under rsLoRA); every other tensor (a new
    head, DoRA's magnitudes) as it is. peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
    writes the same A and B, but in peft 0.21 nothing else: it would lose the head and the magnitudes.
    deltatune sets no rank_pattern or alpha_pattern, so r and alpha are the same for every layer.
    """
    weights = path / "adapter_model.safetensors"
    state = safetensors_torch.load_file(weights)
    for key, initial in start.items():
        trained, initial = state[key], initial.to(state[key])
        state[key] = torch.cat([trained, initial], 0) if _factor(key) == "A" else torch.cat([trained, -initial], 1)
    safetensors_torch.save_file(state, weights, metadata={"format": "pt"})
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config["r"] *= 2
    config["lora_alpha"] *= math.sqrt(2) if config.get("use_rslora") else 2
    config["init_lora_weights"] = True  # loading must not decompose the (untouched) base again
    file.write_text(json.dumps(config, indent=2, sort_keys=True))
