"""The method protocol: what every way of adapting a model provides.

A tuned model is the base plus a delta. A method decides which tensors form that delta
(``apply``), saves and reloads only those (``save_delta`` / ``load_delta``), and, where the
algebra allows, folds them into the base weights (``merge``) so serving costs nothing extra.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import CannotMerge, RunError
from ..lazy import lazy

if TYPE_CHECKING:
    from torch import Tensor, nn

torch = lazy("torch")
safetensors_torch = lazy("safetensors.torch")

DELTA_FILE = "delta.safetensors"


@dataclass
class NoOptions:
    """This method has no options."""


class Method:
    """One way of adapting a model. Class attributes say what the method can do, so code outside
    ``methods/`` asks the method instead of comparing its name."""

    name: str = ""
    summary: str = ""
    Options: type = NoOptions
    # ``merge`` folds the delta into the base weights and returns a plain model (else CannotMerge says why).
    can_merge: bool = False
    # Trained virtual tokens are prepended to every input (soft prompts): every position shifts, and
    # packed examples would share one prompt.
    prepends_virtual_tokens: bool = False
    # The base is loaded quantized (``load_kwargs``); its frozen weights take a fraction of the memory.
    quantized_base: bool = False
    # The delta can be switched off at run time (peft's ``disable_adapter``), so the tuned model gives
    # the base model back as a reference (PPO's KL term) without a second copy of the weights.
    switchable_off: bool = False
    # Examples are encoded once by the frozen base and cached (``prepare_examples``); training reads
    # the cached vectors, so no activations of the base are kept for backward.
    caches_features: bool = False
    # Unmerged, the tuned model is still ordinary torch layers mapping the base's inputs to its outputs
    # (adapters inserted between layers, a head on pooled states), so a graph exporter (ONNX) can trace
    # it as it is when ``merge`` cannot fold it; soft prompts, which add inputs, are not.
    traceable: bool = False
    # The peak learning rate this method trains well at, used when train.lr is unset (an explicit value
    # wins), and where it comes from in one line (shown by `deltatune validate` and in the run's config).
    # Methods differ by orders of magnitude here (full fine-tuning ~2e-5, soft prompts ~0.3): one shared
    # rate mostly measures which method happens to suit it. Chosen from the literature, not yet swept.
    default_lr: float = 5e-5
    default_lr_source: str = "no published rate for this method: deltatune's former shared default"
    # How `deltatune merge-deltas` can combine several deltas of this method into one (``combine``), by the
    # names users give (--how); empty: it cannot.
    combinations: tuple[str, ...] = ()

    def accepts(self, task) -> str | None:
        """Why this method cannot train ``task`` (a task class from ``tasks.registry``), or None.

        Tasks say the same of methods (``Task.accepts``); ``components.supports`` asks both."""
        return None

    def search_space(self) -> dict:
        """This method's options worth tuning, in ``hpo``'s format: option name -> a list of choices
        (categorical) or ``{low, high[, log]}`` (a range). ``deltatune tune`` searches them as
        ``<method>.<option>``."""
        return {}

    def combine(self, base: nn.Module, deltas: list[Path], weights: list[float], how: str, density: float,
                rank: int | None) -> tuple[dict[str, Tensor], dict]:
        """One delta from several saved ``deltas`` of this method on the same ``base`` (``combinations``
        names the ways): its tensors and its saved config, heads left out (the caller decides how heads of
        different tasks combine). ``combine_problems`` first says which deltas cannot take part."""
        raise CannotMerge(f"{self.name}: its deltas cannot be combined")

    def combine_problems(self, delta: Path) -> list[str]:
        """Why the saved delta in ``delta`` cannot be combined with others (an empty list: it can)."""
        return [] if self.combinations else [f"{self.name} deltas cannot be combined"]

    def fit(self, model: nn.Module, examples: list, options, seed: int) -> dict | None:
        """Fit the delta directly, instead of by the loop's gradient steps, where the problem allows it
        (feature extraction's head on cached features is convex); returns what the fit found (logged), or
        None: the loop trains it."""
        return None

    def fits_directly(self, options) -> bool:
        """Whether ``fit`` replaces the loop for these options (known from the config alone): then
        train.lr is not used, and ``train.lr: auto`` has nothing to search."""
        return False

    def lr_scale(self, name: str, options) -> float:
        """The learning rate of the trainable parameter ``name`` as a multiple of train.lr (LoRA+ trains its B
        matrices faster); the loop gives each scale its own optimizer group."""
        return 1.0

    def load_kwargs(self, options) -> dict:
        """Extra ``from_pretrained`` arguments for the base (QLoRA loads it quantized)."""
        return {}

    def after_step(self, model: nn.Module, options, step: int, total: int) -> None:
        """Called by the loop after every optimizer step (one skipped for a NaN/inf gradient too), before the
        gradients are cleared; ``step`` counts the steps done, this one included, of ``total``. AdaLoRA moves
        its rank budget here."""

    def start_batches(self, options) -> int:
        """How many of the first training batches ``data_start`` reads before the first step; 0 (most methods):
        the delta's start needs no data."""
        return 0

    def data_start(self, model: nn.Module, options, batches: list[dict]) -> dict[str, Tensor]:
        """The delta's start computed from ``batches`` (the loop's first collated micro-batches, in its order),
        before the first step: LoRA's EVA sets each A from its layer's inputs. Returns the tensors that
        ``set_start`` puts in place; the run keeps them, so that a resumed run sets the same start without
        reading the data again. Leaves ``model`` as it was."""
        raise NotImplementedError

    def set_start(self, model: nn.Module, options, state: dict[str, Tensor]) -> None:
        """Put in place what ``data_start`` returned (the trainable tensors' shapes may change)."""
        raise NotImplementedError

    def loop_state(self, model: nn.Module) -> dict[str, Tensor]:
        """Tensors the method keeps beside its trainable weights while training (AdaLoRA's importance averages);
        checkpoints save them, so that a resumed run continues exactly."""
        return {}

    def load_loop_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Put back, when a run resumes, what ``loop_state`` returned."""

    def apply(self, model: nn.Module, options, task) -> nn.Module:
        """Freeze or wrap ``model`` so that exactly the delta is trainable.

        ``task`` is the task class (or an instance): methods read its attributes (``peft_type``,
        ``new_head``), never its name."""
        raise NotImplementedError

    def delta_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """Only what was trained."""
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def save_delta(self, model: nn.Module, path: Path, options, state: dict[str, Tensor] | None = None) -> None:
        """``state``: for a model that holds only shards of its parameters (FSDP), its trainable parameters and
        buffers as full tensors (the loop gathers them); saved instead of what the model holds."""
        path.mkdir(parents=True, exist_ok=True)
        if state is not None:
            delta = {n: state[n].contiguous() for n, p in model.named_parameters() if p.requires_grad}
        else:
            delta = {k: v.contiguous() for k, v in self.delta_state_dict(model).items()}
        safetensors_torch.save_file(delta, path / DELTA_FILE)
        (path / "method.json").write_text(json.dumps({"method": self.name, "options": asdict(options)}))

    def load_delta(self, model: nn.Module, path: Path, options, task) -> nn.Module:
        """Apply the method to a fresh base ``model`` and load the saved delta into it."""
        model = self.apply(model, options, task)
        file = Path(path) / DELTA_FILE
        if not file.is_file():
            raise RunError(f"{path}: no {DELTA_FILE}; this run did not finish saving its delta")
        state = safetensors_torch.load_file(file)
        expected = set(self.delta_state_dict(model))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise RunError(f"{file}: the saved delta does not fit this model (missing {missing}, "
                           f"unexpected {extra}); was it trained on another base model?")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """Return a plain model whose weights include the delta."""
        raise CannotMerge(f"{self.name} cannot be merged into the base weights")

    @contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[nn.Module]:
        """The base model inside a tuned one, for a block: the delta switched off (``switchable_off``)."""
        raise RunError(f"{self.name}: its delta cannot be switched off; load the base model instead")
        yield model  # pragma: no cover (a generator, so that the error comes on entering the block)

    def untouched(self, model: nn.Module) -> nn.Module:
        """A module that computes what the base model computes, for the baseline metrics.

        Most methods are the identity at initialisation, so this is ``model`` itself; soft
        prompts are not, and override it."""
        return model

    def prepare_examples(self, model: nn.Module, examples: list[dict]) -> list[dict]:
        """A hook for methods that precompute something per example (feature extraction)."""
        return examples


def set_trainable(model: nn.Module, keep) -> None:
    """Freeze every parameter, then unfreeze those whose name satisfies ``keep(name)``."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(keep(name)))
