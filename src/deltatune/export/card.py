"""The model card (README.md) every export carries: what the model is, how it was made, how well it
does, and how to load it, in words a person reads before shipping it."""

from __future__ import annotations

import json

from ..inference import RunParts


def model_card(parts: RunParts, manifest: dict, usage: str) -> str:
    metrics = _read(parts, "metrics.json")
    main = parts.task.main_metric.name if hasattr(parts.task, "main_metric") else None
    after, before = metrics.get("eval", {}), metrics.get("baseline", {})
    lines = [f"# {parts.run.path.name}: {parts.cfg.task} with {parts.cfg.method.name}", "",
             f"A fine-tuned model exported by deltatune {manifest['deltatune']} as **{manifest['format']}**"
             + (f" ({manifest['quantize']})" if manifest.get("quantize") else "") + ".", "",
             "| | |", "|---|---|",
             f"| base model | `{parts.cfg.model}` |",
             f"| task | {parts.cfg.task} |",
             f"| method | {parts.cfg.method.name} |"]
    if "trainable_params" in metrics:
        share = metrics["trainable_params"] / metrics["total_params"] if metrics.get("total_params") else None
        lines.append(f"| trainable parameters | {metrics['trainable_params']:,}"
                     + (f" of {metrics['total_params']:,} ({share:.2%})" if share is not None else "") + " |")
    if parts.task.labels:
        lines.append(f"| labels | {', '.join(map(str, parts.task.labels))} |")
    data = _read(parts, "data.json")
    if data.get("fingerprint"):
        lines.append(f"| training data | {data.get('train')} ({data.get('train_rows')} training rows, "
                     f"{data.get('eval_rows')} evaluation rows), fingerprint `{data['fingerprint'][:16]}` |")
    lines.append(f"| made by | `{manifest['command']}` |")
    shown = [k for k, v in after.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if shown:
        lines += ["", "## Evaluation", "", "On the run's evaluation split, before (the base model) and after tuning"
                  + (f"; the main metric is {main}" if main else "") + ".", "",
                  "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {k} | {_num(before.get(k))} | {_num(after[k])} |" for k in shown]
    check = manifest.get("check")
    if isinstance(check, str):  # export --no-check
        lines += ["", "## Not checked", "", f"Exported with `--no-check` ({check}): no runtime loaded this export and "
                  "compared it with the run. Export again without `--no-check` to have it checked."]
    elif check:
        lines += ["", "## Checked by the runtime", "", f"Loaded by {check.get('runtime', 'its runtime')} at export "
                  "time and compared with the run's own model:", ""]
        lines += [f"- {k.replace('_', ' ')}: {_num(v)}" for k, v in check.items() if k != "runtime"]
    lines += ["", "## Use", "", usage.strip(), "", "## Files", "",
              "`export.json` lists every file with its SHA-256; `config.yaml` is the run's resolved configuration.", ""]
    return "\n".join(lines)


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _read(parts: RunParts, name: str) -> dict:
    try:
        return json.loads((parts.run.path / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
