"""The layers of DESIGN.md hold: `lint-imports` (the contracts in pyproject.toml) passes on the
package, and fails, naming the contract, on a copy given one upward import, at the top of a
module or hidden inside a function."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run lint-imports with pyproject.toml's contracts on the deltatune package found in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([sys.executable, "-c", LINT, "--config", str(ROOT / "pyproject.toml"), "--no-cache",
                           "--no-logo"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_every_contract(tmp_path):
    result = lint_imports(ROOT / "src", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


UPWARD = {  # config.py (the bottom layer) reaching up to the training loop: an import cycle waiting to happen
    "at the top": "from .errors import ConfigError\nfrom .train import run as _run  # noqa: F401\n",
    "inside a function": "from .errors import ConfigError\n\n\ndef _upward():\n    from .train import run  # noqa: F401\n",
}


@pytest.mark.parametrize("where", list(UPWARD))
def test_an_upward_import_breaks_the_layers(where, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "deltatune", src / "deltatune", ignore=shutil.ignore_patterns("__pycache__"))
    config = src / "deltatune" / "config.py"
    text = config.read_text()
    assert "from .errors import ConfigError\n" in text
    config.write_text(text.replace("from .errors import ConfigError\n", UPWARD[where], 1))
    result = lint_imports(src, tmp_path)
    assert result.returncode != 0, result.stdout
    assert "Layers: a module imports only from the layers below it (DESIGN.md) BROKEN" in result.stdout
    assert "deltatune.config -> deltatune.train.run" in result.stdout
