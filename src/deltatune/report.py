"""Readable before/after tables for a run's metrics, on stderr (stdout keeps the machine-readable output)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

MAX_MATRIX = 12  # classes; a wider confusion matrix does not fit a terminal
MAIN = ("accuracy", "macro_f1", "entity_f1", "entity_precision", "entity_recall", "loss", "perplexity", "reward",
        "accuracy_chosen")


def summary_table(metrics: dict, run_path: Path | None = None, title: str = "deltatune") -> None:
    """Baseline (untouched model) against the tuned model, cost figures, and for classifiers and taggers
    the per-class precision / recall / F1 and the confusion matrix."""
    console = Console(stderr=True)
    if run_path:  # on its own line: a long path never breaks the table's title into fragments
        console.print(f"[bold]{title}[/bold] {run_path}", soft_wrap=True)
    ev, base = metrics.get("eval", {}), metrics.get("baseline")
    table = Table(title="before and after training" if base else "evaluation", title_justify="left")
    table.add_column("metric")
    if base:
        table.add_column("before (untouched)", justify="right")
    table.add_column("after (tuned)" if base else "value", justify="right")
    for key in (k for k in MAIN if isinstance(ev.get(k), (int, float))):
        table.add_row(key, *([_number(base.get(key))] if base else []), _number(ev[key]))
    if "trainable_params" in metrics:
        pct = 100 * metrics["trainable_params"] / max(metrics["total_params"], 1)
        extra = [("trainable params", f"{metrics['trainable_params']:,} ({pct:.2f}%)"),
                 ("train time", f"{metrics['train_seconds']:.1f} s"),
                 ("peak memory (RSS)", f"{metrics['peak_rss_mb']:,.0f} MB")]
        for name, value in extra:
            table.add_row(name, *([""] if base else []), value)
    console.print(table)
    if isinstance(ev.get("per_class"), dict) and ev["per_class"]:
        console.print(_per_class(ev["per_class"], (base or {}).get("per_class")))
    labels = list(ev.get("per_class") or {})
    if ev.get("confusion_matrix") and len(labels) <= MAX_MATRIX:
        console.print(_confusion(ev["confusion_matrix"], labels))
    elif ev.get("confusion_matrix"):
        console.print(f"confusion matrix: {len(labels)} classes, too many to show here: metrics.json has it")


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else ""


def _per_class(per_class: dict, before: dict | None) -> Table:
    table = Table(title="per class (after training)", title_justify="left")
    for column in ("class", "precision", "recall", "F1", *(["F1 before"] if before else []), "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, figures in per_class.items():
        old = [_number((before.get(name) or {}).get("f1"))] if before else []
        table.add_row(name, _number(figures.get("precision")), _number(figures.get("recall")),
                      _number(figures.get("f1")), *old, f"{figures.get('support', 0):,}")
    return table


def _confusion(matrix: list[list[int]], labels: list[str]) -> Table:
    table = Table(title="confusion matrix", title_justify="left")
    table.add_column("true \\ predicted")
    for label in labels:
        table.add_column(label, justify="right")
    for true, (label, row) in enumerate(zip(labels, matrix)):
        table.add_row(label, *(f"[bold]{n:,}[/bold]" if i == true else f"{n:,}" for i, n in enumerate(row)))
    return table
