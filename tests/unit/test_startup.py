"""Commands that only read configs, registries or run folders start fast: they import none of the
heavy libraries (torch alone takes seconds). Each runs in a fresh interpreter, which then lists what
it imported. benchmarks/startup.py measures the time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
HEAVY = ("torch", "transformers", "peft", "accelerate", "safetensors", "datasets", "optuna", "sklearn", "mlflow",
         "tensorboard")

RUN = """
import json, sys
from deltatune.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exc:  # --help
    code = exc.code
with open(sys.argv[1], "w") as fh:
    json.dump({"code": code, "heavy": [m for m in %r if m in sys.modules]}, fh)
""" % (HEAVY,)


def finished_run(folder: Path) -> Path:
    """A run directory that RunDir.require_complete accepts: metrics.json, delta/, status.json."""
    run = folder / "run"
    (run / "delta").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"eval": {"accuracy": 0.9}}))
    (run / "status.json").write_text(json.dumps({"status": "completed"}))
    return run


COMMANDS = {
    "help": ["--help"],
    "validate --explain": ["validate", "--explain"],
    "validate CONFIG": ["validate", str(ROOT / "configs/minilm/classification-lora.yaml")],
    "validate CONFIG with trackers": ["validate", str(ROOT / "configs/minilm/classification-lora.yaml"),
                                      "train.report_to=[tensorboard,mlflow]"],
    "methods": ["methods"],
    "tasks": ["tasks"],
    "runs list": ["runs", "list"],
    "eval RUN_DIR": ["eval", "{run}"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_that_computes_nothing_imports_nothing_heavy(name, tmp_path):
    # the registry is this test's own ($DELTATUNE_REGISTRY, set by conftest, reaches the subprocess)
    run = str(finished_run(tmp_path))
    argv = [run if a == "{run}" else a for a in COMMANDS[name]]
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, "-c", RUN, str(out), *argv], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["code"] == 0, result.stderr[-2000:]
    assert report["heavy"] == [], f"deltatune {' '.join(argv)} imported {report['heavy']}"
