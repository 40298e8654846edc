"""The commands that run a model start again on tcmalloc (allocator.py); DELTATUNE_ALLOCATOR=system refuses it."""

import json
import os
import subprocess
import sys

import pytest

from deltatune import allocator
from tests.helpers import QUICK

linux = pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="no tcmalloc here (make install adds it)")


def test_preload_is_added_once_and_refused_on_request(tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "LIBRARY_DIRS", (tmp_path,))
    assert allocator.tcmalloc_environment({}) is None  # not on this machine: nothing changes
    (tmp_path / allocator.TCMALLOC).write_bytes(b"")
    lib = str(tmp_path / allocator.TCMALLOC)
    env = allocator.tcmalloc_environment({"LD_PRELOAD": "/x/libother.so", "KEEP": "1"})
    assert env["LD_PRELOAD"] == f"{lib}:/x/libother.so" and env["KEEP"] == "1"  # the user's preload is kept
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no stack printed for a model's weights
    assert allocator.tcmalloc_environment(env) is None  # started again once, never in a loop
    assert allocator.tcmalloc_environment({allocator.ENV: "system"}) is None
    assert allocator.tcmalloc_environment({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None  # the user's malloc
    other = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2", allocator.ENV: "system", "KEEP": "1"}
    assert allocator.child_environment("system", other) == {"KEEP": "1"}  # benchmarks' sides: nothing preloaded
    assert allocator.child_environment("tcmalloc", other)["LD_PRELOAD"] == lib


@linux
@pytest.mark.parametrize("choice", ["default", "system"])
def test_train_from_the_command_line_runs_on_the_allocator_chosen(choice, tiny_bert, cls_csv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if choice == "system":
        env[allocator.ENV] = "system"
    args = [f"model={tiny_bert}", "task=classification", "method.name=lora", f"data.train={cls_csv}", *QUICK,
            "train.max_steps=1", f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", *args, "--quiet"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tcmalloc" not in proc.stderr  # no large-allocation reports
    recorded = json.loads((tmp_path / "run" / "env.json").read_text())["allocator"]
    assert recorded == ("tcmalloc" if choice == "default" else "system")


def test_a_call_from_python_keeps_its_process(tiny_bert, cls_csv, tmp_path):
    """main(argv) inside a Python process (tests, notebooks) never replaces that process."""
    from deltatune.cli import main

    args = [f"model={tiny_bert}", "task=classification", "method.name=lora", f"data.train={cls_csv}", *QUICK,
            "train.max_steps=1", f"output_dir={tmp_path / 'run'}"]  # no --quiet: it would stay set in os.environ
    assert main(["train", *args]) == 0
    assert json.loads((tmp_path / "run" / "env.json").read_text())["allocator"] == allocator.active()
