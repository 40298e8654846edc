"""What the preference tasks (reward, dpo) share: preference files read as they are, split by prompt."""

from __future__ import annotations

from pathlib import Path

from ..assets import DATASETS
from ..config import Config, DataConfig
from ..data.examples import PreparedData, prepare_preferences
from ..data.preferences import Preference, load_preferences
from .base import Task

# The data settings a preference file ignores (the cleaning pipeline does not run on it).
UNUSED = ("test", "test_fraction", "kfold", "shots_per_class", "templates", "format", "tasks",
          "clean", "dedup", "pii", "augment", "control_chars")


class PreferenceTask(Task):
    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        out = super().problems(cfg)
        for key in ("train", "eval"):
            ref = getattr(cfg.data, key)
            if ref in DATASETS or (ref and (Path(ref).expanduser() / "data_report.json").is_file()):
                out.append(f"data.{key}: task {cfg.task} needs a preference file (rows with prompt, chosen "
                           f"and rejected, or prompt, responses and ranking), not {ref!r}")
        unused = [k for k in UNUSED if getattr(cfg.data, k) != getattr(DataConfig(), k)]
        if unused:
            out.append(f"data: {', '.join(unused)} do not apply to task {cfg.task} (a preference file is "
                       "used as it is); remove them")
        return out

    def encode(self, prefs: list[Preference], tokenizer) -> list:
        raise NotImplementedError

    def prepare(self, tokenizer) -> PreparedData:
        return prepare_preferences(self.cfg, lambda prefs: self.encode(prefs, tokenizer))

    def file_examples(self, path: str, tokenizer) -> list:
        return self.encode(load_preferences(path, self.cfg.data.on_error), tokenizer)
