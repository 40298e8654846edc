"""Two processes (accelerate launch, gloo DDP on the CPU) train like one process at the same global batch.

The launch is the one docs/scale.md gives: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2 ...`` (accelerate's ``--cpu`` flag alone starts a single process; the
variable makes the spawned processes join a gloo process group on the CPU).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.configure import load_config
from deltatune.rundir import new_run_dir
from deltatune.train import run as run_module
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job
from tests.conftest import qa_rows, write_jsonl
from tests.helpers import QUICK

ROOT = Path(__file__).resolve().parents[2]
CPU_DDP = ROOT / "configs" / "accelerate" / "cpu-ddp.yaml"


def train_loop_only(overrides: list[str]) -> None:
    """What `deltatune train` does around the loop, minus run.py's bookkeeping (see the CLI test below)."""
    cfg = load_config(None, overrides)
    job, _, _ = build_job(cfg, None)
    job.run = new_run_dir(cfg.output_dir, cfg.run_name)
    run_loop(job)


DRIVER = "import sys\nfrom tests.e2e.test_ddp import train_loop_only\ntrain_loop_only(sys.argv[1:])\n"


def _pythonpath() -> str:  # the driver imports this module
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], tmp_path: Path, processes: int = 2, config: Path = CPU_DDP,
            check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", f"--config_file={config}",
           f"--num_processes={processes}", f"--main_process_port={_free_port()}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 or not check, proc.stderr[-4000:]
    return proc


def _log(out: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval" in r]


def _overrides(model: Path, data: Path, method: str, out: Path, batch: int, *extra: str) -> list[str]:
    return [f"model={model}", "task=causal_lm", f"method.name={method}", f"data.train={data}", *QUICK,
            "data.train_limit=32", "train.epochs=2", "train.lr=2e-2", "train.warmup_ratio=0",
            "eval.forgetting=false", f"train.batch_size={batch}", f"output_dir={out}",
            "train.group_by_length=false", *extra]  # length groups depend on the per-process batch


@pytest.fixture
def qa_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", qa_rows(80))


@pytest.mark.e2e  # several processes, each importing torch: slow on a busy machine
@pytest.mark.parametrize("method, extra", [("lora", ["method.dropout=0", "train.eval_every=2"]),
                                           ("full", ["train.grad_accum=2"])])
def test_two_processes_follow_the_one_process_loss_trajectory(tiny_llama, qa_data, tmp_path, method, extra):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    train_loop_only(_overrides(tiny_llama, qa_data, method, tmp_path / "one", 8, *extra))  # here, alone
    _launch([str(driver), *_overrides(tiny_llama, qa_data, method, tmp_path / "two", 4, *extra)], tmp_path)
    (one, one_evals), (two, two_evals) = _log(tmp_path / "one"), _log(tmp_path / "two")
    # 32 rows, global batch 8: 4 micro-batches per epoch, 2 epochs; one log line per step (main only)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, len(one) + 1))
    assert len(one) == (8 if method == "lora" else 4)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (a, b)
        assert b["tokens"] == a["tokens"]  # summed over both processes
    assert one[-1]["loss"] < one[0]["loss"]  # it learns: the trajectories compared are not flat
    # evaluation runs once, on the main process, over the whole evaluation set
    assert [e["step"] for e in two_evals] == [e["step"] for e in one_evals]
    for a, b in zip(one_evals, two_evals):
        assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], rel=1e-4)
        assert b["eval"]["tokens"] == a["eval"]["tokens"]
    assert (tmp_path / "two" / "best").is_dir()


@pytest.mark.e2e
def test_a_launch_accelerate_does_not_join_is_refused(tiny_llama, qa_data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**{k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}, "PYTHONPATH": _pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(driver), *_overrides(tiny_llama, qa_data, "lora", tmp_path / "x", 4)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not (tmp_path / "x" / "log.jsonl").exists()


RUN_PY_PATCHED = "is_main_process" in Path(run_module.__file__).read_text()


@pytest.mark.e2e
@pytest.mark.skipif(not RUN_PY_PATCHED, reason="needs the run.py patch that lets only the main process write "
                                                "the run directory and the registry (see docs/scale.md)")
def test_deltatune_train_under_accelerate_launch_writes_one_complete_run(tiny_llama, qa_data, tmp_path):
    from deltatune import registry_db

    # (the autouse fixture's DELTATUNE_REGISTRY is inherited by the launched processes)
    _launch(["-m", "deltatune.cli", "train", *_overrides(tiny_llama, qa_data, "lora", tmp_path / "run", 4)],
            tmp_path)
    out = tmp_path / "run"
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8 and (out / "delta").is_dir() and not (out / "checkpoint").exists()
    assert [r["step"] for r in _log(out)[0]] == list(range(1, 9))
    assert [(r["kind"], r["status"]) for r in registry_db.list_runs()] == [("train", "completed")]


@pytest.mark.parametrize("name", ["cpu-ddp", "cpu-fsdp", "multi-gpu-ddp", "multi-node-ddp", "fsdp", "deepspeed-zero2"])
def test_shipped_accelerate_configs_pass_accelerates_own_checks(name):
    """No GPU here: the multi-GPU files are only parsed, by accelerate's own loader (unknown keys
    are errors) and its launch options / DeepSpeed plugin for the nested sections (the CPU ones are also
    run: here and in test_fsdp.py)."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    file = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    loaded = load_config_from_file(str(file))
    raw = yaml.safe_load(file.read_text())
    assert loaded.distributed_type == DistributedType(raw["distributed_type"])
    assert loaded.num_processes == raw["num_processes"] and loaded.num_machines == raw["num_machines"]
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(raw.get("fsdp_config", {})) <= options
    if "deepspeed_config" in raw:
        assert set(raw["deepspeed_config"]) <= options
        assert DeepSpeedPlugin(**raw["deepspeed_config"]).zero_stage == raw["deepspeed_config"]["zero_stage"]
