"""`deltatune tune`: an Optuna study over training settings and over the method itself.

Each trial is an ordinary training run (its own run directory under the study folder), built
from the base config plus the trial's ``key=value`` overrides, so a trial is reproducible with
`deltatune train` and the best one is written out as a ready-to-train YAML.

The search space is a mapping from config keys to choices:

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}     # float range
    train.batch_size: [8, 16, 32]                        # categorical
    method.name: [lora, ia3, bitfit]                     # the method is searched too
    lora.r: [4, 8, 16]                                   # method options apply only when that method is drawn
    freeze.trainable_layers: {low: 1, high: 6}           # int range (both ends whole numbers)

Storage is SQLite in the study folder unless ``--storage`` names any Optuna storage URL, so
several workers (processes or machines) can share one study, and a study that was killed
resumes: trials it left running are failed after a heartbeat timeout and the study goes on until
``trials`` trials have finished.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import yaml

from .config import Config, dump_yaml, read_yaml
from .configure import load_config
from .errors import ConfigError, OutputError
from .fs import atomic_write_text, foreign_entries
from .train.study import Study, open_study, optimize, study_entry

METRIC_DIRECTIONS = {"accuracy": "maximize", "macro_f1": "maximize", "loss": "minimize",
                     "perplexity": "minimize", "reward": "maximize", "margin": "maximize",
                     "trainable_params": "minimize", "train_seconds": "minimize", "peak_rss_mb": "minimize"}

TRAIN_SPACE = {
    "train.lr": {"low": 1e-5, "high": 3e-3, "log": True},
    "train.weight_decay": [0.0, 0.01, 0.1],
    "train.warmup_ratio": [0.0, 0.06, 0.1],
}


def default_space() -> dict:
    """The training settings above, plus ``<method>.<option>`` for every registered method's own
    search space (``Method.search_space``)."""
    from .methods import registry

    space = dict(TRAIN_SPACE)
    for name in registry.names():
        space.update({f"{name}.{option}": choice for option, choice in registry.get(name).search_space().items()})
    return space


def parse_objectives(text: str | None, task: str) -> list[tuple[str, str]]:
    """``"macro_f1,trainable_params"`` -> [("macro_f1", "maximize"), ("trainable_params", "minimize")]."""
    from .tasks import registry as tasks

    default = tasks.get(task).main_metric.name
    out = []
    for name in (text or default).split(","):
        name = name.strip()
        if name not in METRIC_DIRECTIONS:
            raise ConfigError([f"--objectives: unknown metric {name!r}; choose from {', '.join(METRIC_DIRECTIONS)}"])
        out.append((name, METRIC_DIRECTIONS[name]))
    return out


def read_space(path: str | None) -> dict:
    if path is None:
        return default_space()
    space = read_yaml(path)  # a missing file, YAML errors and keys given twice: named
    if not space:
        raise ConfigError([f"{path}: expected a mapping of config keys to choices (see `deltatune tune --help`)"])
    for key, choice in space.items():
        if not (isinstance(choice, list) and choice) and not (isinstance(choice, dict) and {"low", "high"} <= set(choice)):
            raise ConfigError([f"{path}: {key}: give a non-empty list of values or {{low, high[, log]}}"])
    return space


def run_study(study: Study, base: str | None, overrides: list[str], space: dict, workers: int = 1) -> dict:
    """Run (or resume) the study to ``trials`` finished trials; returns the summary it writes."""
    cfg = load_config(base, overrides)  # fail on a bad base config before any worker starts
    check_folder(study.folder)
    study.folder.mkdir(parents=True, exist_ok=True)
    seed = cfg.train.seed
    if workers <= 1:
        optimize(study, base, overrides, space, seed)
    else:
        ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
        procs = [ctx.Process(target=optimize, args=(study, base, overrides, space, seed + i)) for i in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    return summarize(study, base, overrides)


def summarize(study: Study, base: str | None, overrides: list[str]) -> dict:
    """The best trial (or the Pareto front), with the best config written as YAML."""
    import optuna

    s = open_study(study, 0)
    done = [t for t in s.trials if t.state == optuna.trial.TrialState.COMPLETE]
    states = {state.name.lower(): sum(t.state == state for t in s.trials) for state in optuna.trial.TrialState}
    summary = {"study": study.name, "storage": study.storage,
               "objectives": {name: direction for name, direction in study.objectives}, "trials": states}
    if not done:
        return summary
    front = s.best_trials
    summary["best"] = [{"number": t.number, "values": list(t.values), "params": t.params,
                        "run_dir": t.user_attrs.get("run_dir")} for t in front]
    best = max(front, key=lambda t: t.values[0] if study.objectives[0][1] == "maximize" else -t.values[0])
    cfg = load_config(base, [*overrides, *best.user_attrs["overrides"]])
    cfg.output_dir = None
    path = study.folder / "best.yaml"
    atomic_write_text(path, f"# best trial {best.number} of study {study.name}: "
                            f"{dict(zip([n for n, _ in study.objectives], best.values))}\n" + dump_yaml(cfg))
    summary["best_config"] = str(path)
    atomic_write_text(study.folder / "summary.yaml", yaml.safe_dump(summary, sort_keys=False))
    return summary


def check_folder(folder: Path) -> None:
    """``OutputError`` when the study folder holds anything a study did not write (``study_entry``): a study
    never overwrites anything else."""
    if os.path.lexists(folder) and not folder.is_dir():
        raise OutputError(f"{folder}: the study folder exists and is not a folder; set another output_dir or --name")
    foreign = foreign_entries(folder, study_entry)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(f"{folder}: holds files that are not a deltatune study's ({shown}); tune writes its "
                          "trials, study.db, best.yaml and summary.yaml there and never overwrites anything else: "
                          "set another output_dir (or --name), a new or empty folder or an earlier study's to resume it")


def default_study(cfg: Config, name: str | None, storage: str | None, trials: int, objectives) -> Study:
    study_name = name or f"tune-{cfg.run_name}"
    folder = Path(cfg.output_dir) if cfg.output_dir else Path("runs") / study_name
    return Study(study_name, folder, storage or f"sqlite:///{(folder / 'study.db').resolve()}", objectives, trials)


def print_summary(summary: dict) -> None:
    print(yaml.safe_dump(summary, sort_keys=False), end="", file=sys.stdout)
