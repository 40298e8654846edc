"""Optuna studies on a tiny model: complete, share one study across workers, resume after a kill."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
import time

import optuna
import pytest
import yaml

from deltatune import registry_db
from deltatune.configure import load_config
from deltatune.errors import ConfigError, Stopped
from deltatune.hpo import parse_objectives, read_space, run_study
from deltatune.train.checkpoint import LoopState
from deltatune.train.study import Study, _pruning_callback, suggest
from deltatune.rundir import RunDir
from deltatune.train.run import train

SPACE = {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "method.name": ["lora", "bitfit"],
         "lora.r": [2, 4], "houlsby.reduction_factor": [4, 8]}


def _base(tiny_bert, cls_csv):
    return [f"model={tiny_bert}", f"data.train={cls_csv}", "train.batch_size=8", "train.max_steps=3",
            "train.eval_every=1"]


def _study(tmp_path, trials=3, objectives=(("accuracy", "maximize"),)):
    folder = tmp_path / "study"
    return Study("s", folder, f"sqlite:///{folder / 'study.db'}", list(objectives), trials)


def _schema_ready(db) -> bool:
    """The worker has created the study's tables and its study: opening the storage before that races the
    worker creating the same tables (optuna's alembic_version insert fails in one of the two processes)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return all(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0
                       for table in ("alembic_version", "studies"))
    except sqlite3.Error:  # no file or no tables yet
        return False


def _finished(study):
    s = optuna.load_study(study_name=study.name, storage=study.storage)
    return [t for t in s.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def test_three_trial_study_completes_and_writes_a_trainable_best_config(tiny_bert, cls_csv, tmp_path):
    study = _study(tmp_path)
    summary = run_study(study, None, _base(tiny_bert, cls_csv), SPACE)
    trials = _finished(study)
    assert len(trials) == 3 and summary["trials"]["complete"] + summary["trials"]["pruned"] == 3
    for t in trials:
        assert ("lora.r" in t.params) == (t.params["method.name"] == "lora")  # options follow the method
        assert "houlsby.reduction_factor" not in t.params
    best = load_config(summary["best_config"])
    assert best.method.name == summary["best"][0]["params"]["method.name"]
    assert best.train.lr == pytest.approx(summary["best"][0]["params"]["train.lr"])


def test_two_objectives_report_the_pareto_front(tiny_bert, cls_csv, tmp_path):
    study = _study(tmp_path, trials=3, objectives=parse_objectives("accuracy,trainable_params", "classification"))
    summary = run_study(study, None, _base(tiny_bert, cls_csv), SPACE)
    front = summary["best"]
    assert front and all(len(t["values"]) == 2 for t in front)
    for a in front:  # no member of the front is dominated by another
        assert not any(b["values"][0] >= a["values"][0] and b["values"][1] <= a["values"][1] and b != a
                       and (b["values"][0] > a["values"][0] or b["values"][1] < a["values"][1]) for b in front)


def test_two_workers_share_one_study(tiny_bert, cls_csv, tmp_path):
    study = _study(tmp_path, trials=4)
    run_study(study, None, _base(tiny_bert, cls_csv), SPACE, workers=2)
    trials = _finished(study)
    assert len(trials) >= 4 and len({t.number for t in trials}) == len(trials)
    assert len({t.user_attrs["run_dir"] for t in trials}) == len(trials)  # one run directory per trial


def test_a_killed_study_resumes(tiny_bert, cls_csv, tmp_path):
    study = _study(tmp_path, trials=3)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.getcwd()!r})
        from pathlib import Path
        from deltatune.hpo import Study, run_study
        from tests.unit.test_hpo import SPACE
        study = Study("s", Path({str(study.folder)!r}), {study.storage!r}, [("accuracy", "maximize")], 3)
        run_study(study, None, {_base(tiny_bert, cls_csv) + ["train.max_steps=30"]!r}, SPACE)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if _schema_ready(study.folder / "study.db"):
            try:
                if _finished(study):
                    break
            except Exception:  # the study table may not exist yet
                pass
        time.sleep(0.5)
    assert proc.poll() is None, "the study finished before it could be killed; make trials longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_finished(study))
    assert 1 <= killed_at < 3
    run_study(study, None, _base(tiny_bert, cls_csv), SPACE)
    assert len(_finished(study)) == 3


def test_suggest_and_space_errors(tmp_path):
    trial = optuna.trial.FixedTrial({"train.lr": 1e-3, "method.name": "houlsby", "houlsby.reduction_factor": 8})
    space = {**SPACE, "method.name": ["lora", "houlsby"]}
    assert suggest(trial, {k: v for k, v in space.items() if k != "lora.r"}, "lora") == [
        "method.name=houlsby", "train.lr=0.001", "method.reduction_factor=8"]
    bad = tmp_path / "space.yaml"
    bad.write_text(yaml.safe_dump({"train.lr": {"low": 1}}))
    with pytest.raises(ConfigError, match="train.lr"):
        read_space(str(bad))
    bad.write_text("train.lr: [1e-4]\ntrain.lr: [1e-3]\n")  # given twice: refused, not the later one kept
    with pytest.raises(ConfigError, match=r"train.lr: given twice \(lines 1 and 2\)"):
        read_space(str(bad))
    bad.write_text("train.lr: [1e-4\n")
    with pytest.raises(ConfigError, match="cannot parse YAML"):
        read_space(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        read_space(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown metric 'acc'"):
        parse_objectives("acc", "classification")


def test_cli_tune_records_trials_and_writes_best_yaml(tiny_bert, cls_csv, tmp_path, capsys):
    from deltatune import registry_db
    from deltatune.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"train.lr": [1e-3, 3e-3], "lora.r": [2, 4]}))
    out = tmp_path / "study"
    assert main(["tune", *_base(tiny_bert, cls_csv), f"output_dir={out}", "--trials", "2",
                 "--space", str(space)]) == 0
    summary = yaml.safe_load(capsys.readouterr().out)
    assert summary["trials"]["complete"] + summary["trials"]["pruned"] == 2
    assert load_config(out / "best.yaml").method.name == "lora"
    trials = registry_db.list_runs(kind="trial")
    assert len(trials) == 2 and all(str(out) in t["path"] for t in trials)
    assert main(["tune", *_base(tiny_bert, cls_csv), "--trials", "0"]) == 2


def test_a_pruned_trial_is_recorded_as_pruned_not_failed(tiny_bert, cls_csv, tmp_path):
    class Trial:  # the two calls the pruning callback makes on an optuna trial
        reported = []

        def report(self, value, step):
            self.reported.append((step, value))

        def should_prune(self):
            return len(self.reported) == 2

    out = tmp_path / "trial"
    cfg = load_config(None, [*_base(tiny_bert, cls_csv), f"output_dir={out}", "train.progress=false"])
    with pytest.raises(Stopped, match="pruned at step 2"):
        train(cfg, callbacks=(_pruning_callback(Trial()),), kind="trial")
    assert [step for step, _ in Trial.reported] == [1, 2]
    assert RunDir(out).status() == "pruned" and "pruned at step 2" in RunDir(out).read_json("status.json")["reason"]
    assert registry_db.get(str(out))["status"] == "pruned"


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs" / "spaces").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_search_spaces_give_valid_configs(path):
    space = read_space(str(path))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = Path(__file__).parents[2] / "configs"
    base = configs / ("smollm2-135m/causal_lm-lora.yaml" if "llama" in path.stem else "minilm/classification-lora.yaml")
    drawn, methods = set(), set()
    for _ in range(12):
        overrides = suggest(study.ask(), space, "lora")
        methods.add(load_config(base, overrides).method.name)  # every drawn combination validates
        drawn.add(tuple(overrides))
    assert len(drawn) > 6 and (len(methods) > 1 or "method.name" not in space)


@pytest.mark.parametrize("direction,metric", [("minimize", [8.0, 6.0, 10.0]), ("maximize", [0.8, 0.6, 0.4])])
def test_pruning_reports_in_the_study_s_direction(direction, metric):
    # The loop's score is higher-is-better (perplexity 8 -> -8). A minimizing study must receive the perplexities
    # themselves, so that its median pruner stops the third trial, the worst, and not a better one.
    study = optuna.create_study(direction=direction, pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    pruned = []
    for value in metric:
        trial = study.ask()
        state = LoopState(step=1, best=value if direction == "maximize" else -value)
        try:
            _pruning_callback(trial, direction)(state)
        except Stopped:
            pruned.append(value)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    assert [t.intermediate_values[1] for t in study.trials] == metric
    assert pruned == [metric[2]]
