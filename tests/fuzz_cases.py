"""Fuzz cases for the command line, shared by the bounded property tests (tests/unit/test_fuzz_cli.py)
and the long campaign (benchmarks/fuzz.py).

Each case is a config YAML text (``deltatune validate``) or a data file (``deltatune data prepare``
on it), run in-process through the CLI entry point. The only acceptable outcomes: exit 0 with
consistent output, or exit 2 with one ``error:`` message and nothing half-written. Anything else
(an exception escaping ``main``, another exit code, a message that is not ours, a hang) is a defect.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import string
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from hypothesis import strategies as st

from deltatune.cli import main

SECONDS = 30  # a case that takes longer has hung

# ----------------------------------------------------------------------------- values

nasty_text = st.text(alphabet=st.sampled_from(list(string.printable) + ["\x00", "\x1b", "\x7f", "\x85", "\u2028",
                                                                       "é", "\ufeff", "\ud7ff", "😀", "\u202e"]),
                     max_size=20)
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2, 10**9])
           | st.floats(allow_subnormal=False) | st.sampled_from([float("nan"), float("inf"), 1e30, -0.0, 0.5])
           | nasty_text | st.sampled_from(["auto", "true", "", "none", "lora", "classification", "fail", "skip"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(nasty_text, inner, max_size=3),
                      max_leaves=6)

SECTIONS = {
    "": ["model", "task", "output_dir", "run_name", "method", "data", "train", "eval", "dpo", "reward", "ppo"],
    "method": ["name", "r", "alpha", "dropout", "target_modules", "num_virtual_tokens", "freeze_layers", "rank"],
    "data": ["train", "eval", "test", "text_column", "label_column", "eval_fraction", "dedup", "near_dup_threshold",
             "pii", "eda", "train_limit", "eval_limit", "shots_per_class", "pack", "on_error", "control_chars",
             "template", "kfold", "leakage", "min_chars", "max_chars", "stratify", "seed"],
    "train": ["epochs", "max_steps", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
              "max_grad_norm", "max_length", "seed", "eval_every", "save_every", "bf16", "on_nonfinite",
              "group_by_length", "chunked_loss", "gradient_checkpointing", "progress"],
    "eval": ["forgetting", "forgetting_rows", "icl_shots", "icl_limit"],
    "dpo": ["beta", "loss"], "reward": ["loss"], "ppo": ["reward_fn", "reward_model", "kl_coef", "rollout_batch"],
}


def base_config(model: Path, data: Path) -> dict:
    return {"model": str(model), "task": "classification", "method": {"name": "lora", "r": 4},
            "data": {"train": str(data), "eval_fraction": 0.25}, "train": {"epochs": 1, "lr": 1e-3, "batch_size": 8}}


@st.composite
def config_texts(draw, model: Path, data: Path) -> tuple[str | bytes, bool]:
    """(a config, whether it must be refused): the valid base with a few keys set to odd values (or
    removed), rendered as YAML, and sometimes rewritten with YAML's own features (anchors, tags,
    duplicate keys, other top-levels)."""
    cfg = base_config(model, data)
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(sorted(SECTIONS)))
        key = draw(st.sampled_from(SECTIONS[section]) | nasty_text)
        target = cfg if not section else cfg.setdefault(section, {})
        if not isinstance(target, dict):
            continue
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(values)
    text = yaml.safe_dump(cfg, allow_unicode=draw(st.booleans()), sort_keys=False)
    twist = draw(st.sampled_from(["none"] * 6 + ["anchor", "merge", "tag", "python-tag", "duplicate", "list",
                                                 "scalar", "truncate", "tab", "bom", "binary"]))
    if twist == "anchor":
        text = f"defaults: &d {{lr: 0.001}}\n{text}extra: *d\n"
    elif twist == "merge":
        text = text.replace("train:\n", "common: &c {seed: 3}\ntrain:\n  <<: *c\n", 1)
    elif twist == "tag":
        text += draw(st.sampled_from(["when: !!timestamp 2001-12-14\n", "blob: !!binary aGVsbG8=\n",
                                      "x: !!set {a, b}\n", "odd: !custom 3\n"]))
    elif twist == "python-tag":  # must never run: safe loading refuses the tag
        text += "boom: !!python/object/apply:os.system ['touch /tmp/deltatune-fuzz-pwned']\n"
    elif twist == "duplicate":
        text += draw(st.sampled_from(["model: other\n", "task: classification\n", "train: {lr: 0.1}\n"]))
    elif twist == "list":
        text = "- " + text.replace("\n", "\n  ")
    elif twist == "scalar":
        text = draw(st.sampled_from(["42\n", "'just a string'\n", "null\n", "~\n", "[]\n", ""]))
    elif twist == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif twist == "tab":
        text = text.replace("  ", "\t", 1)
    elif twist == "bom":
        text = "\ufeff" + text
    elif twist == "binary":
        return text.encode() + draw(st.binary(min_size=1, max_size=40)), False
    return text, twist in ("python-tag", "duplicate", "list")


# ----------------------------------------------------------------------------- data files

WORDS = "good bad great awful fine poor the movie plot was".split()
odd = st.sampled_from(["", " ", "NA", "null", "positive", "negative", "a,b", 'say "hi"', "x\ny", "\t"]) | nasty_text
typed = st.none() | st.integers(-5, 5) | st.floats(allow_subnormal=False) | st.lists(st.integers(), max_size=2) \
    | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2) | st.booleans()
FORMATS = [".csv", ".tsv", ".jsonl", ".json", ".parquet"]


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(suffix, file bytes): rows of text/label (sometimes other columns, types, ragged rows or broken
    encodings), in one of the formats, occasionally not that format at all. The odd cases come with set
    probabilities (hypothesis' own choices lean to the edges), so most files are ordinary data sets."""
    rng = draw(st.randoms(use_true_random=True))  # plain probabilities (not leaning to the edges)
    suffix = rng.choice(FORMATS)
    if rng.random() < 0.05:
        return suffix, draw(st.binary(max_size=200))  # not the format at all
    size = rng.random()
    n = rng.choice([0, 1, 2, 3]) if size < 0.15 else 2000 if size > 0.99 else rng.randint(8, 30)
    columns = ["text", "label"] if rng.random() < 0.8 else rng.choice(
        [["label", "text", "id"], ["text"], ["sentence", "label"], ["text", "label", "text"]])
    typed_rows = suffix in (".jsonl", ".json", ".parquet") and rng.random() < 0.2
    rows = []
    for i in range(n):
        row = {}
        for c in columns:
            if typed_rows and rng.random() < 0.3:
                row[c] = draw(typed)
            elif c == "id":
                row[c] = str(i)
            elif rng.random() < 0.1:
                row[c] = draw(odd) if rng.random() < 0.98 else "word " * 20000  # now and then a huge cell
            else:
                row[c] = rng.choice(["positive", "negative"]) if c == "label" else " ".join(
                    rng.choices(WORDS, k=rng.randint(1, 6)))
        rows.append(row)
    body = _render(suffix, columns, rows, rng)
    if suffix == ".parquet":
        return suffix, body
    encoding = "utf-8" if rng.random() < 0.85 else rng.choice(["utf-8-sig", "utf-16", "latin-1"])
    try:
        data = body.encode(encoding)
    except UnicodeEncodeError:
        data = body.encode("utf-8")
    if rng.random() < 0.05 and data:  # a file cut short
        data = data[:rng.randint(0, len(data))]
    return suffix, data


def _render(suffix: str, columns: list[str], rows: list[dict], rng):
    if suffix == ".parquet":
        buffer = io.BytesIO()
        try:
            table = pa.Table.from_pylist(rows) if rows else pa.table({c: pa.array([], pa.string()) for c in columns})
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in a column: as strings
            table = pa.Table.from_pylist([{k: str(v) for k, v in r.items()} for r in rows])
        pq.write_table(table, buffer)
        return buffer.getvalue()
    if suffix in (".jsonl", ".json"):
        lines = [json.dumps(r, ensure_ascii=rng.random() < 0.5) for r in rows]
        if suffix == ".json":
            return "[" + ",\n".join(lines) + "]"
        ending = "" if rng.random() < 0.9 else rng.choice(["\n", "{broken\n", "[1, 2]\n"])
        return "".join(line + "\n" for line in lines) + ending
    sep = "," if suffix == ".csv" else "\t"

    def cell(v):
        v = str(v)
        return '"' + v.replace('"', '""') + '"' if any(ch in v for ch in (sep, '"', "\n", "\r")) else v
    lines = [sep.join(columns)]
    for r in rows:
        values = [cell(r[c]) for c in columns]
        if rng.random() < 0.03:  # a ragged row
            values = values[:-1] if rng.random() < 0.5 else values + ["extra"]
        lines.append(sep.join(values))
    return "\n".join(lines) + rng.choice(["", "\n", "\r\n"])


# ----------------------------------------------------------------------------- running a case

class Hang(Exception):
    pass


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``deltatune ARGV`` in-process: (exit code, stdout, stderr). A case over SECONDS raises Hang."""
    out, err = io.StringIO(), io.StringIO()

    def alarm(signum, frame):
        raise Hang(f"deltatune {' '.join(argv)} took over {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse: a usage error, exit 2
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.getvalue(), err.getvalue()


def check_refusal(code: int, err: str) -> None:
    assert code == 2, f"exit {code}: {err[-2000:]}"
    assert err.startswith(("error: ", "usage: ")), err[-2000:]
    assert "Traceback" not in err, err


def validate_case(text: str | bytes, must_refuse: bool, folder: Path) -> str:
    """``deltatune validate`` on the text; returns "valid" or "refused" (raises on a defect). A valid
    config holds only finite numbers, and resolves to a config that validates to itself."""
    path = folder / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    code, out, err = run_cli(["validate", str(path)])
    assert not Path("/tmp/deltatune-fuzz-pwned").exists(), "a YAML tag ran code"
    if code != 0:
        check_refusal(code, err)
        return "refused"
    assert not must_refuse, "a duplicate key, a list or a python tag was accepted"
    assert all(math.isfinite(v) for v in _floats(yaml.safe_load(out))), f"a non-finite number was accepted:\n{out}"
    again = folder / "resolved.yaml"  # what validate prints is itself a valid config, the same one
    again.write_text(out, encoding="utf-8")
    code2, out2, err2 = run_cli(["validate", str(again)])
    assert code2 == 0 and out2 == out, f"the resolved config does not validate to itself: {err2}"
    return "valid"


def _floats(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _floats(v)
    elif isinstance(value, list):
        for v in value:
            yield from _floats(v)


def prepare_case(suffix: str, data: bytes, model: Path, folder: Path, on_error: str = "skip") -> str:
    """``deltatune data prepare`` on the file; returns "prepared" or "refused" (raises on a defect)."""
    file = folder / f"data{suffix}"
    file.write_bytes(data)
    out = folder / "prepared"
    code, stdout, err = run_cli(["data", "prepare", f"model={model}", f"data.train={file}", "data.eval_fraction=0.25",
                                 f"data.on_error={on_error}", "--out", str(out)])
    if code != 0:
        check_refusal(code, err)
        assert not out.exists(), "a refused preparation left its output folder"
        return "refused"
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["rows_out"] == sum(report["rows_per_split"].values()), report
    assert report["rows_out"] <= report["rows_in"], report
    return "prepared"


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="deltatune-fuzz-"))
