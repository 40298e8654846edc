"""The language models the Feedback and Playground pages offer: completed runs of tasks that write text (from
the run registry), the base models those runs were trained on, and the packaged decoders that are ready.

A choice travels through a form as a short key (``run:ID``, ``base:ID`` for the base model of run ID,
``asset:NAME``), which is looked up again here: a request never names a path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

from .. import assets
from .. import registry_db as db
from ..errors import AssetError
from .pages.runs import model_name


@dataclass(frozen=True)
class TextModel:
    key: str           # what a form sends
    label: str         # what a person reads
    ref: str           # what loads it: a run folder, or a model (a folder or a packaged alias)
    run: dict | None   # the run's registry record (``run:`` keys), else None


def writing_tasks() -> set[str]:
    from ..tasks import registry as tasks  # torch: only when a page asks

    return {name for name in tasks.names() if tasks.get(name).generates}


def text_runs() -> list[dict]:
    """Completed training runs whose model writes responses (causal_lm, dpo, kto, ...), newest first."""
    writers = writing_tasks()
    return [r for r in db.list_runs(status="completed") if r["task"] in writers and r["kind"] in db.OWN_DIR]


def run_choice(run: dict) -> TextModel:
    label = f"run {run['id']} · {run['task']} · {run['method'] or 'full'} on {model_name(run['model'])}"
    return TextModel(f"run:{run['id']}", label, run["path"], run)


def base_choices(runs: list[dict]) -> list[TextModel]:
    """Each base model the runs were trained on, once (keyed by its newest run), and the packaged decoders."""
    seen: dict[str, TextModel] = {}
    for run in runs:
        if run["model"] and run["model"] not in seen:
            seen[run["model"]] = TextModel(f"base:{run['id']}", f"base model {model_name(run['model'])} (no delta)",
                                           run["model"], None)
    for name, kind, description, state in assets.status():
        if kind == "model" and state == "ready" and name not in seen and _decoder(name):
            seen[name] = TextModel(f"asset:{name}", f"packaged model {name} (no delta)", name, None)
    return list(seen.values())


def choices() -> list[TextModel]:
    """Every model a person can sample from: runs first (newest first), then base models."""
    runs = text_runs()
    return [run_choice(r) for r in runs] + base_choices(runs)


def resolve(key: str, allowed: list[TextModel] | None = None) -> TextModel:
    """The model a form's key names, or a 400 saying where the choices are."""
    for choice in allowed if allowed is not None else choices():
        if choice.key == key:
            return choice
    raise HTTPException(400, f"model {key[:40]!r} is not one of the completed text-writing runs or base models "
                             "this page lists; reload the page and choose from the list")


def _decoder(name: str) -> bool:
    """A packaged model that writes text (its config names a causal-LM architecture)."""
    try:
        config = json.loads((Path(assets.resolve_model(name)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, AssetError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])
