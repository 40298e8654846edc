import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.run import resume, train
from tests.helpers import config

COMMON = ["train.epochs=2", "train.grad_accum=2", "train.save_every=2", "train.lr=2e-3"]


def _losses(run_path):
    lines = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


@pytest.mark.parametrize("stop_at", [3, 4], ids=["mid-epoch", "epoch-boundary"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_bert, cls_csv, tmp_path, stop_at):
    straight = train(config(tiny_bert, "classification", "full", cls_csv, tmp_path / "a", *COMMON))

    def interrupt(state):
        if state.step == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "full", cls_csv, tmp_path / "b", *COMMON), callbacks=(interrupt,))
    broken = tmp_path / "b"
    assert json.loads((broken / "status.json").read_text())["status"] == "interrupted"
    assert not (broken / "metrics.json").exists() and not (broken / "delta").exists()

    resumed = resume(broken)
    a, b = load_file(straight.delta / "model.safetensors"), load_file(resumed.delta / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(straight.path) == _losses(resumed.path)
    metrics_a = json.loads((straight.path / "metrics.json").read_text())
    metrics_b = json.loads((resumed.path / "metrics.json").read_text())
    assert metrics_a["eval"] == metrics_b["eval"] and metrics_a["baseline"] == metrics_b["baseline"]
    assert json.loads((broken / "status.json").read_text())["status"] == "completed"


def test_resume_refuses_changed_data(tiny_bert, cls_csv, tmp_path):
    from deltatune.errors import RunError

    def interrupt(state):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "r", *COMMON), callbacks=(interrupt,))
    cls_csv.write_text(cls_csv.read_text().replace("great", "fine"))
    with pytest.raises(RunError, match="the data changed"):
        resume(tmp_path / "r")


def _interrupted(model, data, out, at_step):
    def interrupt(state):
        if state.step == at_step:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(model, "classification", "lora", data, out, *COMMON), callbacks=(interrupt,))


def test_damaged_checkpoint_is_named_with_what_to_do(tiny_bert, cls_csv, tmp_path):
    from deltatune.errors import RunError

    _interrupted(tiny_bert, cls_csv, tmp_path / "r", 3)
    weights = tmp_path / "r" / "checkpoint" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    with pytest.raises(RunError, match=r"checkpoint cannot be read .*damaged. Remove the folder .*checkpoint"):
        resume(tmp_path / "r")
    import shutil
    shutil.rmtree(tmp_path / "r" / "checkpoint")  # as the message says: the run starts over, same result
    straight = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "a", *COMMON))
    resumed = resume(tmp_path / "r")
    assert _losses(straight.path) == _losses(resumed.path)


def test_resume_cleans_what_crashed_writes_left(tiny_bert, cls_csv, tmp_path):
    _interrupted(tiny_bert, cls_csv, tmp_path / "r", 3)
    run = tmp_path / "r"
    (run / ".best_metrics.json.partial-x1y2").write_text("{")  # a write killed before its rename
    (run / ".checkpoint.partial-abc").mkdir()                   # a checkpoint killed while it was built
    (run / "log.jsonl").write_text((run / "log.jsonl").read_text() + '{"step": 9, "lo')  # a line cut short
    resume(run)
    assert not list(run.glob(".*")), list(run.glob(".*"))
    assert json.loads((run / "status.json").read_text())["status"] == "completed"


def test_an_error_while_writing_inputs_never_leaves_status_running(tiny_bert, cls_csv, tmp_path, monkeypatch):
    import errno

    from transformers import PreTrainedTokenizerFast

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", full_disk)
    with pytest.raises(OSError):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "r", *COMMON))
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["error"]
    assert not (tmp_path / "r" / "tokenizer").exists() and not list((tmp_path / "r").glob(".tokenizer*"))


def test_run_files_get_the_usual_permissions(tiny_bert, cls_csv, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        run = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "r", "train.max_steps=2"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((run.path / "status.json").stat().st_mode) == 0o644  # not a temp file's 0600
    assert stat.S_IMODE((run.path / "config.yaml").stat().st_mode) == 0o644
    assert stat.S_IMODE(run.delta.stat().st_mode) == 0o755 and stat.S_IMODE(run.tokenizer.stat().st_mode) == 0o755


def test_a_killed_run_is_told_apart_from_a_running_one(tiny_bert, cls_csv, tmp_path, capsys):
    import os
    import socket
    import subprocess

    from deltatune.cli import main
    from deltatune.errors import RunError

    _interrupted(tiny_bert, cls_csv, tmp_path / "r", 3)
    run = tmp_path / "r"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id that no longer exists
    for pid, expected in ((gone.pid, "was killed while it trained"), (os.getpid(), "still training")):
        (run / "status.json").write_text(json.dumps({"status": "running", "pid": pid, "host": socket.gethostname()}))
        assert main(["predict", str(run), "--text", "good"]) == 2
        assert expected in capsys.readouterr().err
    with pytest.raises(RunError, match="still training .*stop it first"):
        resume(run)  # status names this live process: a second writer is refused
    (run / "status.json").write_text(json.dumps({"status": "running", "pid": gone.pid, "host": socket.gethostname()}))
    assert json.loads((resume(run).path / "status.json").read_text())["status"] == "completed"


NEW_PEFT_METHODS = ["vera", "loha", "lokr", "oft", "adalora"]


@pytest.mark.parametrize("method", NEW_PEFT_METHODS)
def test_peft_methods_resume_bit_identically(method, tiny_bert, cls_csv, tmp_path):
    """Stopped after step 7 of 8 (its checkpoint from step 6): AdaLoRA's last reallocation (step 7) then rests on
    importance averages over steps 1-6, which must come back from the checkpoint (Method.loop_state): without
    them this test fails."""
    straight = train(config(tiny_bert, "classification", method, cls_csv, tmp_path / "a", *COMMON))

    def interrupt(state):
        if state.step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", method, cls_csv, tmp_path / "b", *COMMON), callbacks=(interrupt,))
    resumed = resume(tmp_path / "b")
    assert json.loads((straight.path / "metrics.json").read_text())["steps"] == 8
    assert _losses(straight.path) == _losses(resumed.path)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (straight.delta / name).read_bytes() == (resumed.delta / name).read_bytes(), name
    if method == "adalora":  # ranks were removed before the best evaluation: the budget was in play
        pattern = json.loads((resumed.delta / "adapter_config.json").read_text())["rank_pattern"]
        assert pattern and sum(map(sum, pattern.values())) < 12 * len(pattern)
