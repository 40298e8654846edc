"""Soft-prompt methods via peft: the base model is frozen; trained vectors steer it.

- prefix tuning (Li & Liang, 2021): trained key/value vectors are prepended in every layer.
- prompt tuning (Lester et al., 2021): trained embeddings are prepended to the input,
  initialised from a text's token embeddings or at random.
- P-tuning (Liu et al., 2021): the prepended embeddings come from a small MLP or LSTM
  prompt encoder.

None of them changes a weight matrix, so none can merge: the prompt travels with the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ..config import doc
from ..lazy import lazy
from .peft_common import PeftMethod, head_modules, task_type
from .registry import register

if TYPE_CHECKING:
    from torch import nn

peft = lazy("peft")

WHY = ("the trained virtual tokens are inputs, not weight changes, so there is nothing to fold into "
       "the base; serve the run directory (base + delta), or train lora or ia3 for a merged model")


class SoftPromptMethod(PeftMethod):
    why_no_merge = WHY
    prepends_virtual_tokens = True

    def search_space(self) -> dict:
        return {"num_virtual_tokens": [5, 10, 20]}

    @contextmanager
    def switched_off(self, model: nn.Module) -> Iterator[nn.Module]:
        yield self.untouched(model)  # the virtual tokens live outside the wrapped model

    def untouched(self, model: nn.Module) -> nn.Module:
        # The virtual tokens live outside the wrapped model: it alone is the base. (peft's
        # disable_adapter() fails for prompt learning on models that do not generate, e.g. BERT.)
        return model.get_base_model()


def _tokens_problem(n: int) -> list[str]:
    return [] if n >= 1 else [f"num_virtual_tokens: must be at least 1, got {n}"]


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = doc(20, "Length of the trained prefix (key/value vectors per layer).")
    projection: bool = doc(False, "Produce the prefix through a two-layer MLP (more stable, more parameters).")
    encoder_hidden_size: int | None = doc(None, "Hidden width of that MLP (default: the model's hidden size).")

    def problems(self) -> list[str]:
        return _tokens_problem(self.num_virtual_tokens)


@dataclass
class PromptOptions:
    num_virtual_tokens: int = doc(20, "Number of trained embeddings prepended to the input.")
    init_text: str | None = doc(None, "Initialise them from this text's token embeddings (else at random).")

    def problems(self) -> list[str]:
        return _tokens_problem(self.num_virtual_tokens)


@dataclass
class PTuningOptions:
    num_virtual_tokens: int = doc(20, "Number of virtual tokens produced by the prompt encoder.")
    encoder: str = doc("mlp", "Prompt encoder: mlp or lstm.")
    encoder_hidden_size: int = doc(128, "Hidden width of the prompt encoder.")

    def problems(self) -> list[str]:
        bad = [] if self.encoder in ("mlp", "lstm") else [f"encoder: use mlp or lstm, got {self.encoder!r}"]
        return bad + _tokens_problem(self.num_virtual_tokens)


@register
class Prefix(SoftPromptMethod):
    name = "prefix"
    summary = "trained key/value prefixes in every layer (peft)"
    default_lr = 5e-3  # Liu et al. 2022 (P-tuning v2): prefixes at 5e-3..1e-2 on NLU tasks
    default_lr_source = "Liu et al. 2022 (P-tuning v2, deep prefixes on NLU tasks): 5e-3 to 1e-2"
    Options = PrefixOptions

    def peft_config(self, options: PrefixOptions, task, model: nn.Module) -> peft.PrefixTuningConfig:
        return peft.PrefixTuningConfig(task_type=task_type(task), num_virtual_tokens=options.num_virtual_tokens,
                                       prefix_projection=options.projection,
                                       encoder_hidden_size=options.encoder_hidden_size or model.config.hidden_size,
                                       modules_to_save=head_modules(task, model))


@register
class Prompt(SoftPromptMethod):
    name = "prompt"
    summary = "trained input embeddings prepended to the text (peft)"
    default_lr = 0.3  # Lester et al. 2021 (prompt tuning): 0.3 with Adafactor on T5
    default_lr_source = "Lester et al. 2021 (prompt tuning): 0.3 on T5"
    Options = PromptOptions

    def peft_config(self, options: PromptOptions, task, model: nn.Module) -> peft.PromptTuningConfig:
        text = options.init_text
        init = peft.PromptTuningInit.TEXT if text else peft.PromptTuningInit.RANDOM
        return peft.PromptTuningConfig(task_type=task_type(task), num_virtual_tokens=options.num_virtual_tokens,
                                       prompt_tuning_init=init, prompt_tuning_init_text=text,
                                       tokenizer_name_or_path=model.name_or_path if text else None,
                                       modules_to_save=head_modules(task, model))


@register
class PTuning(SoftPromptMethod):
    name = "ptuning"
    summary = "virtual tokens from an MLP/LSTM prompt encoder (peft)"
    default_lr = 3e-3  # P-tuning (Liu et al. 2021) and its re-implementations: 1e-3..1e-2; the middle
    default_lr_source = ("Liu et al. 2021 (P-tuning) and its re-implementations: 1e-3 to 1e-2 for the prompt "
                         "encoder; the geometric middle")
    Options = PTuningOptions

    def peft_config(self, options: PTuningOptions, task, model: nn.Module) -> peft.PromptEncoderConfig:
        kind = {"mlp": peft.PromptEncoderReparameterizationType.MLP,
                "lstm": peft.PromptEncoderReparameterizationType.LSTM}
        return peft.PromptEncoderConfig(task_type=task_type(task), num_virtual_tokens=options.num_virtual_tokens,
                                        encoder_reparameterization_type=kind[options.encoder],
                                        encoder_hidden_size=options.encoder_hidden_size,
                                        modules_to_save=head_modules(task, model))
