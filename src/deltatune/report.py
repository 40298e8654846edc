"""Readable before/after tables for a run's metrics."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def summary_table(metrics: dict, run_path: Path | None = None) -> None:
    """Baseline (untouched model) against the tuned model, plus cost figures, on stderr."""
    ev, base = metrics.get("eval", {}), metrics.get("baseline")
    keys = [k for k in ("accuracy", "macro_f1", "loss", "perplexity") if k in ev]
    table = Table(title=f"deltatune: {run_path}" if run_path else "deltatune")
    table.add_column("metric")
    if base:
        table.add_column("before (untouched)", justify="right")
    table.add_column("after (tuned)", justify="right")
    for key in keys:
        row = [key] + ([f"{base[key]:.4f}"] if base else []) + [f"{ev[key]:.4f}"]
        table.add_row(*row)
    if "trainable_params" in metrics:
        pct = 100 * metrics["trainable_params"] / max(metrics["total_params"], 1)
        extra = [("trainable params", f"{metrics['trainable_params']:,} ({pct:.2f}%)"),
                 ("train time", f"{metrics['train_seconds']:.1f} s"),
                 ("peak memory (RSS)", f"{metrics['peak_rss_mb']:,.0f} MB")]
        for name, value in extra:
            table.add_row(name, *([""] if base else []), value)
    Console(stderr=True).print(table)
