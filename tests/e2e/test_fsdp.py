"""Two processes sharding the model with FSDP 2 (torch's ``fully_shard`` over gloo, on the CPU) train like one
process at the same global batch, and save deltas and checkpoints that do not depend on the sharding.

The launch is docs/scale.md's: ``ACCELERATE_USE_CPU=1 accelerate launch --config_file
configs/accelerate/cpu-fsdp.yaml -m deltatune.cli train ...``. accelerate shards only on GPUs;
on the CPU deltatune does it from the same config (src/deltatune/train/sharding.py).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.test_ddp import ROOT, _launch, _log, _overrides, train_loop_only

CPU_FSDP = ROOT / "configs" / "accelerate" / "cpu-fsdp.yaml"


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", qa_rows(80))


LORA = ("method.dropout=0", "train.eval_every=4")


def lora_args(model: Path, data: Path, out: Path) -> list[str]:
    """Two processes of 4 rows each, with a checkpoint every 2 steps."""
    return ["train", *_overrides(model, data, "lora", out, 4, *LORA, "train.save_every=2")]


@pytest.fixture(scope="module")
def lora_launch(tiny_llama, qa_data, tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted 2-process LoRA launch, compared with one process below and with an interrupted and
    resumed launch: (its run directory, the trainable tensors it ended with)."""
    root = tmp_path_factory.mktemp("fsdp-lora")
    _fsdp(root, root / "final.safetensors", lora_args(tiny_llama, qa_data, root / "two"))
    return root / "two", root / "final.safetensors"


def train_and_gather(final: str, stop_at: int, args: list[str]) -> None:
    """``deltatune train ARGS`` (the CLI's own entry) in every process of the launch. After the loop every
    process takes part in gathering the trainable parameters, which the main one writes to ``final``:
    the weights the run ended with, to compare its saved delta with. ``stop_at`` > 0 interrupts the run
    after that step (Ctrl-C in every process)."""
    from safetensors.torch import save_file

    from deltatune import cli
    from deltatune.models import is_sharded
    from deltatune.rundir import is_main_process
    from deltatune.train import run, sharding

    loop = run.run_loop

    def gathering(job, resume=False, callbacks=()):
        def stop(state):
            if state.step == stop_at:
                raise KeyboardInterrupt

        result = loop(job, resume=resume, callbacks=(*callbacks, stop))
        assert is_sharded(job.model), "the launch config asked for FSDP, the model is not sharded"
        full = sharding.trained_state(job.model)
        if is_main_process():
            save_file({n: full[n] for n, p in job.model.named_parameters() if p.requires_grad}, final)
        return result

    run.run_loop = gathering
    sys.exit(cli.main(args))


DRIVER = ("import sys\nfrom tests.e2e.test_fsdp import train_and_gather\n"
          "train_and_gather(sys.argv[1], int(sys.argv[2]), sys.argv[3:])\n")


def _fsdp(tmp_path: Path, final: Path, args: list[str], stop_at: int = 0, check: bool = True):
    driver = tmp_path / "fsdp_driver.py"
    driver.write_text(DRIVER)
    return _launch([str(driver), str(final), str(stop_at), *args], tmp_path, config=CPU_FSDP, check=check)


def _delta_files(run: Path) -> dict[str, torch.Tensor]:
    files = [f for f in ("adapter_model.safetensors", "model.safetensors") if (run / f).is_file()]
    return load_file(run / files[0])


@pytest.mark.e2e  # several processes, each importing torch: slow on a busy machine
@pytest.mark.parametrize("method, extra", [("lora", LORA), ("full", ["train.grad_accum=2", "train.eval_every=2"])])
def test_fsdp_follows_one_process_and_saves_the_weights_it_ended_with(tiny_llama, qa_data, tmp_path, method,
                                                                       extra, request):
    from deltatune.inference import load_run

    train_loop_only(_overrides(tiny_llama, qa_data, method, tmp_path / "one", 8, *extra))  # here, alone
    if method == "lora":  # the launch the resume test also compares with (it checkpoints on the way)
        out, final = request.getfixturevalue("lora_launch")
    else:
        out, final = tmp_path / "two", tmp_path / "final.safetensors"
        _fsdp(tmp_path, final, ["train", *_overrides(tiny_llama, qa_data, method, out, 4, *extra)])
    (one, one_evals), (two, two_evals) = _log(tmp_path / "one"), _log(out)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, len(one) + 1))
    assert len(one) == (8 if method == "lora" else 4)
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5), (a, b)
        assert b["tokens"] == a["tokens"]
    assert one[-1]["loss"] < one[0]["loss"]  # it learns: the trajectories compared are not flat
    # every process evaluates the sharded model; the main one logs it once
    assert [e["step"] for e in two_evals] == [e["step"] for e in one_evals] == [len(one) // 2, len(one)]
    for a, b in zip(one_evals, two_evals):
        assert b["eval"]["loss"] == pytest.approx(a["eval"]["loss"], rel=1e-4)
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    # The delta kept is the best evaluation's; here the last one, so it must hold the final weights.
    assert two_evals[-1]["eval"]["perplexity"] < two_evals[0]["eval"]["perplexity"]
    gathered = load_file(final)
    loaded = dict(load_run(out).model.named_parameters())  # one process, as any user loads a run
    assert gathered and set(gathered) <= set(loaded)
    for name, value in gathered.items():
        assert torch.equal(loaded[name], value), name  # whole tensors, bit for bit
    # the same files as one process's, with the same tensors up to the trajectories' rounding
    alone, sharded = _delta_files(tmp_path / "one" / "best"), _delta_files(out / "delta")
    assert set(alone) == set(sharded)
    for name in alone:
        torch.testing.assert_close(sharded[name], alone[name], rtol=0, atol=1e-4)


@pytest.mark.e2e
def test_an_interrupted_fsdp_run_resumes_to_the_uninterrupted_delta(tiny_llama, qa_data, lora_launch, tmp_path):
    (straight, final), broken = lora_launch, tmp_path / "broken"
    proc = _fsdp(tmp_path, tmp_path / "unused.safetensors", lora_args(tiny_llama, qa_data, broken), stop_at=3,
                 check=False)
    assert proc.returncode != 0
    assert json.loads((broken / "status.json").read_text())["status"] == "interrupted"
    assert not (broken / "delta").exists()
    # the checkpoint of step 2 holds whole tensors, as one process writes them
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["loop"]["step"] == 2
    checkpoint = load_file(broken / "checkpoint" / "trainable.safetensors")
    adapters = _delta_files(straight / "delta")
    assert sorted(t.shape for t in checkpoint.values()) == sorted(t.shape for t in adapters.values())
    _fsdp(tmp_path, tmp_path / "b.safetensors", ["train", "--resume", str(broken)])
    assert json.loads((broken / "status.json").read_text())["status"] == "completed"
    resumed = _delta_files(broken / "delta")
    assert adapters.keys() == resumed.keys()
    for name in adapters:
        assert torch.equal(adapters[name], resumed[name]), name
    final_a, final_b = load_file(final), load_file(tmp_path / "b.safetensors")
    assert final_a.keys() == final_b.keys() and all(torch.equal(final_a[n], final_b[n]) for n in final_a)
    assert [(r["step"], r["loss"]) for r in _log(straight)[0]] == [(r["step"], r["loss"]) for r in _log(broken)[0]]


def test_fsdp_options_not_implemented_on_the_cpu_are_refused_by_name(tiny_llama, qa_data, tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    from deltatune.errors import ConfigError
    from deltatune.train import sharding
    from deltatune.train.run import train
    from tests.helpers import config

    class OnTheCpu:  # what accelerate's Accelerator says under ACCELERATE_USE_CPU=1
        distributed_type = DistributedType.MULTI_CPU

    for key, value in {"ACCELERATE_USE_FSDP": "true", "ACCELERATE_USE_CPU": "1", "FSDP_VERSION": "2",
                       "FSDP_OFFLOAD_PARAMS": "true", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
                       "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                       "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as refused:
        sharding.cpu_plugin(OnTheCpu())
    text = str(refused.value)
    for key in ("fsdp_offload_params", "fsdp_auto_wrap_policy", "fsdp_activation_checkpointing"):
        assert key in text
    assert "fsdp_version" not in text and "fsdp_state_dict_type" not in text
    # `deltatune train` says so before it creates the run directory, with what else FSDP cannot do
    with pytest.raises(ConfigError) as refused:
        train(config(tiny_llama, "causal_lm", "lora", qa_data, tmp_path / "run"))
    assert "eval.forgetting" in str(refused.value) and "fsdp_offload_params" in str(refused.value)
    assert not (tmp_path / "run").exists()
    for key, value in {"FSDP_OFFLOAD_PARAMS": "false", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                       "FSDP_ACTIVATION_CHECKPOINTING": "false"}.items():
        monkeypatch.setenv(key, value)
    assert sharding.cpu_plugin(OnTheCpu()) is not None
    assert [p.split(":")[0] for p in sharding.problems(own_loop=True, forgetting=True)] == ["task", "eval.forgetting"]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert sharding.problems(own_loop=True, forgetting=True) == [] and sharding.cpu_plugin(OnTheCpu()) is None
