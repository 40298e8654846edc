"""Progress on stderr when it is not a terminal: plain lines per phase and at a steady rate while training,
JSON lines with --json-progress, nothing with --quiet; and the command line's any-order arguments."""

import json
import re
from types import SimpleNamespace

import pytest

from deltatune.cli import _parse, main
from deltatune.train import progress
from tests.helpers import QUICK


@pytest.fixture(autouse=True)
def _progress_mode(monkeypatch):
    """main() sets the mode for its process; each test starts from the default and leaves it so."""
    monkeypatch.delenv(progress.ENV, raising=False)


def steps(bar, clock, monkeypatch, times_and_steps):
    for now, step in times_and_steps:
        monkeypatch.setattr(progress.time, "monotonic", lambda now=now: now)
        bar.update(SimpleNamespace(step=step, loss=0.5, tokens=1000 * step, seconds=float(step)))


def test_plain_lines_at_a_steady_rate_with_eta(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "plain")
    with progress.Progress(100, label="train") as bar:
        # the first update, then every EVERY_SECONDS (10 s) at most, and always the last step
        steps(bar, None, monkeypatch, [(0.0, 0), (1.0, 1), (5.0, 5), (10.5, 10), (12.0, 12), (21.0, 20), (22.0, 100)])
    lines = capsys.readouterr().err.splitlines()
    assert [re.search(r"step (\d+)/100", line).group(1) for line in lines] == ["0", "10", "20", "100"]
    assert "ETA 1m34s" in lines[1]  # 90 steps left at 10.5 s per 10 steps
    assert "1,000 tok/s" in lines[1] and "loss 0.5000" in lines[1]
    assert "ETA" not in lines[-1]


def test_json_progress_and_off(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "json")
    with progress.Progress(4, label="train") as bar:
        steps(bar, None, monkeypatch, [(0.0, 2), (30.0, 4)])
    progress.phase("saving", "run/x")
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "phase"]
    assert events[1]["step"] == 4 and events[1]["total"] == 4 and events[1]["tokens_per_s"] == 1000
    assert events[2]["phase"] == "saving" and events[2]["detail"] == "run/x"
    monkeypatch.setenv(progress.ENV, "off")
    progress.phase("saving")
    with progress.Progress(4) as bar:
        steps(bar, None, monkeypatch, [(0.0, 4)])
    assert capsys.readouterr().err == ""


def test_duration():
    assert [progress.duration(s) for s in (0, 42.4, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]


def train(capsys, tiny_bert, cls_csv, out, *flags) -> str:
    code = main(["train", f"model={tiny_bert}", f"data.train={cls_csv}", *QUICK, "train.progress=true", *flags,
                 "train.epochs=1", f"output_dir={out}"])
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def test_a_piped_train_shows_every_phase(tiny_bert, cls_csv, tmp_path, capsys):
    err = train(capsys, tiny_bert, cls_csv, tmp_path / "plain")  # capsys: stderr is not a terminal
    phases = [line.split()[1] for line in err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    for name in ("data", "loading", "baseline", "train", "evaluation", "saving"):
        assert name in phases, (name, err)
    assert phases.index("baseline") < phases.index("train") < phases.index("saving")
    assert re.search(r"train +step \d+/\d+ \(100%\)", err)


def test_quiet_and_json_progress_flags(tiny_bert, cls_csv, tmp_path, capsys):
    quiet = train(capsys, tiny_bert, cls_csv, tmp_path / "quiet", "--quiet")
    assert not re.search(r"^\d\d:\d\d:\d\d ", quiet, re.M), quiet
    events = [json.loads(line) for line in train(capsys, tiny_bert, cls_csv, tmp_path / "json", "--json-progress")
              .splitlines() if line.startswith("{")]
    assert {"step", "phase"} <= {e["event"] for e in events}
    assert any(e.get("phase") == "evaluation" for e in events)


def test_options_and_overrides_in_any_order():
    args = _parse(["tune", "cfg.yaml", "--trials", "3", "output_dir=x", "train.lr=1e-3"])
    assert (args.config, args.overrides, args.trials) == ("cfg.yaml", ["output_dir=x", "train.lr=1e-3"], 3)
    args = _parse(["compare", "a=1", "--methods", "lora", "b=2", "--seeds", "2", "c=3"])
    assert (args.config, args.overrides, args.methods, args.seeds) == ("a=1", ["b=2", "c=3"], "lora", 2)
    args = _parse(["data", "prepare", "cfg.yaml", "--out", "o", "data.dedup.near=true"])
    assert args.overrides == ["data.dedup.near=true"]
    assert _parse(["predict", "run", "--text", "a b", "c", "--text", "d"]).text == ["a b", "c", "d"]
    assert _parse(["runs", "list", "--status", "pruned"]).status == "pruned"


@pytest.mark.parametrize("argv", [["runs", "list", "x=1"], ["validate", "cfg.yaml", "--nope"], ["train", "--bogus"]])
def test_unknown_arguments_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and argv[-1] in err and f"deltatune {argv[0]}" in err
