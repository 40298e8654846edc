"""What the export tests share."""

from __future__ import annotations

from deltatune.cli import main


def cli(capsys, *args) -> tuple[int, str, str]:
    """``deltatune ARGS``: exit code, stdout, stderr (never a traceback)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def probabilities(results: list[dict]) -> list[float]:
    """predict's class probabilities, flat, in label order."""
    return [r["probabilities"][k] for r in results for k in sorted(r["probabilities"])]
