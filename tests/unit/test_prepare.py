"""The preparation pipeline on files with planted problems: the report counts exactly what was planted."""

import csv
import json
import random
from collections import Counter
from html.parser import HTMLParser

import pyarrow.parquet as pq
import pytest

from deltatune.cli import main
from deltatune.configure import load_config
from deltatune.data.prepare import write_prepared
from deltatune.tasks import prepare_rows
from deltatune.data.split import kfold, shots, split_rows, three_way
from deltatune.errors import ConfigError, DataError
from tests.conftest import write_jsonl

WORDS = ("alpha bravo castle delta engine forest garden harbor island jungle kettle ladder meadow needle orange "
         "pepper quartz river saddle timber umbrella velvet walnut yellow zephyr anchor bishop cobalt dragon "
         "ember falcon glacier hollow ivory jasmine kernel lantern marble nectar onyx prairie quiver raven "
         "silver thistle urchin violet willow".split())

# One of every PII type, each in its own sentence (and nowhere else in the file).
PII_ROWS = [
    "please write to jane.doe@example.com about the broken kettle in the garden shed today",
    "call the front desk on +1 415 555 0132 before the river tour leaves the harbor",
    "the card 4111 1111 1111 1111 was charged twice for the velvet saddle and lantern",
    "wire the refund to GB82 WEST 1234 5698 7654 32 once the walnut order is cancelled",
    "the server at 192.168.10.24 stopped answering during the glacier migration last night",
    "our guide Maria Garcia led the group through the prairie and across the cobalt bridge",
]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, 14))


def _row_file(tmp_path, name, rows, extra_lines=()):
    path = tmp_path / name
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for row in rows:
            writer.writerow(row)
        for line in extra_lines:
            fh.write(line + "\n")
    return path


@pytest.fixture
def planted(tmp_path):
    """A train and an eval file with a known number of each problem."""
    rng = random.Random(7)
    base = [(_sentence(rng), "pos" if i % 2 else "neg") for i in range(40)]
    base += [(text, "pos") for text in PII_ROWS]
    train = list(base)
    train += [(base[0][0].upper(), base[0][1]),                   # exact (case)
              ("  " + base[1][0].replace(" ", "   ") + " ", base[1][1]),  # exact (whitespace)
              (base[2][0], "pos" if base[2][1] == "neg" else "neg")]      # exact, conflicting label
    train += [(base[3][0][:-1] + "x", base[3][1]),                 # near: one character changed
              (base[4][0] + " ok", base[4][1])]                    # near: one short word added
    train += [(_sentence(rng), ""), (_sentence(rng), "")]          # missing label: policy drop
    train += [("", "pos")]                                         # missing text: an error row
    train_path = _row_file(tmp_path, "train.csv", train, extra_lines=["one,two,three"])  # malformed
    fresh = [(_sentence(rng), "pos" if i % 2 else "neg") for i in range(10)]
    eval_rows = fresh + [(base[10][0], base[10][1]), (" " + base[11][0].replace(" ", "  "), base[11][1]),  # exact leaks
                         (base[12][0][:-2] + "zz", base[12][1])]                          # near leak
    eval_path = _row_file(tmp_path, "eval.csv", eval_rows)
    return train_path, eval_path


def _cfg(train, eval_=None, *extra):
    args = [f"data.train={train}", "data.clean.missing={label: drop}", "data.on_error=skip",
            "data.dedup.near=true", "data.pii.redact=true", *extra]
    if eval_:
        args.append(f"data.eval={eval_}")
    return load_config(None, args)


def test_report_counts_exactly_what_was_planted(planted, tmp_path):
    train, eval_ = planted
    prepared = prepare_rows(_cfg(train, eval_, "data.dedup.leakage=remove"))
    r = prepared.report
    assert r["rows_in"] == 55 + 13
    assert r["rejected_rows"] == 2  # the malformed line and the empty text
    assert r["missing_handled"] == {"dropped": {"label": 2}, "filled": {}, "total": 2}
    assert r["exact_duplicates_removed"] == 3
    assert r["conflicting_labels"] == 1
    assert r["near_duplicates_removed"] == 2
    assert r["leakage_found"]["eval"] == {"exact": 2, "near": 1}
    assert r["leakage_removed"] == 3
    assert r["pii_redacted"] == {"credit_card": 1, "email": 1, "iban": 1, "ip": 1, "name": 1, "phone": 1}
    assert r["rows_per_split"] == {"train": 46, "eval": 10, "test": 0}
    assert r["rows_out"] == 56 and r["augmented_rows"] == 0
    assert r["label_counts"]["train"] == {"neg": 20, "pos": 26}
    reasons = sorted((x["row"], x["reason"].split(" ")[0]) for x in prepared.rejects)
    assert reasons == [(55, "text"), (56, "3")]  # CSV line numbers, header = line 1
    texts = " ".join(row["text"] for row in prepared.splits["train"])
    for placeholder in ("<EMAIL>", "<PHONE>", "<CREDIT_CARD>", "<IBAN>", "<IP_ADDRESS>", "<NAME>"):
        assert placeholder in texts
    assert "jane.doe@example.com" not in texts and "Maria Garcia" not in texts


def test_leakage_is_reported_but_kept_by_default(planted):
    train, eval_ = planted
    r = prepare_rows(_cfg(train, eval_)).report
    assert r["leakage_found"]["eval"] == {"exact": 2, "near": 1} and r["leakage_removed"] == 0
    assert r["rows_per_split"]["eval"] == 13
    assert {(x["kind"], x["row"]) for x in r["leaks"]} == {("exact", 12), ("exact", 13), ("near", 14)}


def test_a_bad_row_fails_by_default_naming_file_and_row(planted):
    train, _ = planted
    cfg = load_config(None, [f"data.train={train}", "data.clean.missing={label: drop}"])
    with pytest.raises(DataError, match=r"train.csv: row 55: text column .text. is empty"):  # the first bad row
        prepare_rows(cfg)


def test_written_folder_trains_and_is_atomic(planted, tmp_path, tiny_bert):
    train, eval_ = planted
    prepared = prepare_rows(_cfg(train, eval_))
    out = write_prepared(prepared, tmp_path / "prep", "model: x\n")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "data_report.html", "data_report.json",
                                                     "eval.parquet", "rejects.jsonl", "train.parquet"]
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert len(rows) == prepared.report["rows_per_split"]["train"] and {"_row", "_file"} <= set(rows[0])
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert {x["row"] for x in rejects} == {55, 56} and all(x["file"] == str(train) for x in rejects)
    again = prepare_rows(load_config(None, [f"data.train={out}"]))
    assert again.report["fingerprint"] == prepared.report["fingerprint"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared data folder"):
        write_prepared(prepared, tmp_path / "taken", "")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    (out / "notes.txt").write_text("mine too")  # a user's file inside an earlier output: never deleted
    with pytest.raises(DataError, match=r"also holds files data prepare did not write \(notes.txt\)"):
        write_prepared(prepared, out, "")
    assert (out / "notes.txt").read_text() == "mine too"
    (out / "notes.txt").unlink()
    assert write_prepared(prepared, out, "model: y\n") == out  # an earlier output alone is replaced
    assert (out / "config.yaml").read_text() == "model: y\n"


class _Tags(HTMLParser):
    VOID = {"meta", "br", "img"}

    def __init__(self):
        super().__init__()
        self.stack, self.svgs = [], 0

    def handle_starttag(self, tag, attrs):
        self.svgs += tag == "svg"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag not in self.VOID:
            assert self.stack.pop() == tag


def test_cli_prepare_and_inspect(planted, tmp_path, tiny_bert, capsys):
    train, eval_ = planted
    out = tmp_path / "prepared"
    code = main(["data", "prepare", f"model={tiny_bert}", f"data.train={train}", f"data.eval={eval_}",
                 "data.clean.missing={label: drop}", "data.on_error=skip", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["token_lengths"]["train"]["max"] >= report["token_lengths"]["train"]["p50"] > 0
    page = (out / "data_report.html").read_text()
    tags = _Tags()
    tags.feed(page)
    assert tags.stack == []  # every element closed
    assert tags.svgs >= 2 and "Labels in train" in page and "Token lengths in train" in page
    capsys.readouterr()
    assert main(["data", "inspect", str(train), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 54 and summary["malformed_rows"] == 1 and summary["columns"]["label"]["missing"] == 2
    assert main(["data", "inspect", str(tmp_path / "nope.csv")]) == 2


def test_train_runs_the_pipeline_and_keeps_its_report(planted, tiny_bert, tmp_path):
    from deltatune.train.run import train as run_train
    from tests.helpers import QUICK

    train, eval_ = planted
    cfg = load_config(None, [f"model={tiny_bert}", f"data.train={train}", f"data.eval={eval_}",
                             "data.clean.missing={label: drop}", "data.on_error=skip", "data.pii.redact=true",
                             f"output_dir={tmp_path / 'run'}", *QUICK])
    run = run_train(cfg)
    report = json.loads((run.path / "data_report.json").read_text())
    assert report["pii_redacted"]["email"] == 1 and report["rejected_rows"] == 2
    assert len((run.path / "rejects.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------- splits

def _labelled(counts: dict[str, int]) -> list[dict]:
    return [{"text": f"{label} {i}", "label": label} for label, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_three_way_split_keeps_proportions(seed):
    rows = _labelled({"a": 37, "b": 23, "c": 11})
    train, held, test = three_way(rows, 0.2, 0.1, seed, "label")
    assert len(train) + len(held) + len(test) == len(rows)
    assert len({id(r) for r in train + held + test}) == len(rows)
    for part, share in ((held, 0.2), (test, 0.1), (train, 0.7)):
        counts = Counter(r["label"] for r in part)
        for label, n in {"a": 37, "b": 23, "c": 11}.items():
            assert abs(counts[label] - n * share) <= 1, (label, counts[label], n * share)
    assert three_way(rows, 0.2, 0.1, seed, "label") == (train, held, test)
    assert three_way(rows, 0.2, 0.1, seed + 10, "label")[1] != held


def test_kfold_puts_every_row_in_exactly_one_eval_fold():
    rows = _labelled({"a": 20, "b": 9})
    held_all = []
    for fold in range(3):
        train, held = kfold(rows, 3, fold, seed=5, label="label")
        assert len(train) + len(held) == len(rows) and not {id(r) for r in train} & {id(r) for r in held}
        counts = Counter(r["label"] for r in held)
        assert abs(counts["a"] - 20 / 3) <= 1 and abs(counts["b"] - 3) <= 1
        held_all += held
    assert sorted(id(r) for r in held_all) == sorted(id(r) for r in rows)


def test_shots_per_class_and_its_error():
    rows = _labelled({"a": 10, "b": 3})
    few = shots(rows, 2, seed=0, label="label", where="f.csv")
    assert Counter(r["label"] for r in few) == {"a": 2, "b": 2}
    with pytest.raises(DataError, match="label 'b' has only 3 training row"):
        shots(rows, 4, seed=0, label="label", where="f.csv")


def test_split_rows_is_seeded():
    rows = _labelled({"a": 30, "b": 30})
    assert split_rows(rows, 0.25, 3, "label") == split_rows(rows, 0.25, 3, "label")


def test_few_shot_and_kfold_through_the_config(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"text number {i} here,{'ab'[i % 2]}\n" for i in range(30)))
    r = prepare_rows(load_config(None, [f"data.train={path}", "data.shots_per_class=3"])).report
    assert r["label_counts"]["train"] == {"a": 3, "b": 3} and r["left_out_by_limits"] == 30 - 6 - 6
    r = prepare_rows(load_config(None, [f"data.train={path}", "data.kfold=5", "data.fold=4"])).report
    assert r["rows_per_split"] == {"train": 24, "eval": 6, "test": 0}


# ----------------------------------------------------------------------------- cleaning and templates

def test_cleaning_html_unicode_labels_and_fill(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "<p>Hi&nbsp;there</p>"},
            {"instruction": "Ｆｕｌｌ width", "input": "x", "output": "ok"},
            {"instruction": "Fill me", "input": None, "output": "filled"}]
    path = write_jsonl(tmp_path / "inst.jsonl", rows)
    cfg = load_config(None, ["task=causal_lm", f"data.train={path}", "data.format=instruction",
                             "data.clean.strip_html=true", "data.eval_fraction=0.34", "data.dedup.exact=false"])
    prepared = prepare_rows(cfg)
    out = {r["prompt"]: r["response"] for s in ("train", "eval") for r in prepared.splits[s]}
    assert out == {"Say hi": "Hi there", "Full width\n\nx": "ok", "Fill me": "filled"}
    assert prepared.mode == "sft"


def test_label_normalisation_and_mapping(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("text,label\n" + "".join(f"row {i} words,{lab}\n" for i, lab in
                                             enumerate([" Positive", "POS", "negative ", "Neg"] * 5)))
    cfg = load_config(None, [f"data.train={path}", "data.clean.lowercase_labels=true",
                             "data.clean.label_map={pos: positive, neg: negative}"])
    r = prepare_rows(cfg).report
    assert set(r["label_counts"]["train"]) == {"positive", "negative"}


def test_template_naming_a_missing_column_fails_clearly(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}] * 3)
    cfg = load_config(None, ["task=causal_lm", f"data.train={path}",
                             "data.templates={prompt: '{{ qestion }}', response: '{{ answer }}'}"])
    with pytest.raises(DataError, match="qestion"):
        prepare_rows(cfg)
    with pytest.raises(ConfigError, match="data.templates.prompt: invalid Jinja2"):
        prepare_rows(load_config(None, ["task=causal_lm", f"data.train={path}",
                                        "data.templates={prompt: '{{ question '}"]))


def test_length_filters_are_counted(tmp_path):
    path = tmp_path / "len.csv"
    path.write_text("text,label\n" + "".join(f"{'w' * n} {i},{'ab'[i % 2]}\n" for i, n in enumerate([2, 30] * 10)))
    r = prepare_rows(load_config(None, [f"data.train={path}", "data.clean.min_chars=10"])).report
    assert r["length_filtered"] == 10 and r["rows_out"] == 10


def test_prepare_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=x.csv", "data.on_error=ignore", "data.pii.types=[email, ssn]",
                           "data.clean.missing={label: fill}", "data.kfold=1"], check_paths=False)
    text = str(info.value)
    for needle in ("data.on_error", "ssn", "data.clean.fill.label", "data.kfold"):
        assert needle in text


# ----------------------------------------------------------------------------- augmentation and packing

def test_augmentation_touches_training_rows_only(tmp_path, monkeypatch):
    import deltatune.data.lexicon as lexicon

    monkeypatch.setattr(lexicon, "load_lexicon", lambda path=None: {"river": ["stream"], "forest": ["woods"]})
    rng = random.Random(1)
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"{_sentence(rng)},{'a' if i % 4 else 'b'}\n" for i in range(40)))
    cfg = load_config(None, [f"data.train={path}", "data.augment.eda=2", "data.augment.oversample=true"])
    prepared = prepare_rows(cfg)
    r = prepared.report
    train, eval_ = prepared.splits["train"], prepared.splits["eval"]
    assert all(row.get("_augmented") is None for row in eval_)
    made = Counter(row.get("_augmented") for row in train)
    assert made["eda"] == r["augmented_by_kind"]["eda"] > 40  # 32 rows x 2, minus any identical outputs
    assert r["augmented_rows"] == made["eda"] + made["oversample"]
    assert Counter(row["label"] for row in train)["a"] == Counter(row["label"] for row in train)["b"]
    assert not {row["text"].casefold() for row in train} & {row["text"].casefold() for row in eval_}
    assert r["rows_per_split"]["eval"] == 8  # evaluation is untouched


def test_packing_through_the_config(tiny_llama, qa_jsonl, tmp_path):
    from deltatune.train.run import build_job
    from tests.helpers import config

    packed_job, data, _ = build_job(config(tiny_llama, "causal_lm", "lora", qa_jsonl, None, "data.pack=true",
                                           "train.max_length=64"), None)
    assert all("position_ids" in e for e in packed_job.train_examples)
    assert len(packed_job.train_examples) < len(data.train.rows)
    assert sum(len(e["lengths"]) for e in packed_job.train_examples) == len(data.train.rows)
    from deltatune.train.run import train as run_train
    run = run_train(config(tiny_llama, "causal_lm", "lora", qa_jsonl, tmp_path / "run", "data.pack=true",
                           "train.max_length=64", "train.max_steps=2"))
    assert json.loads((run.path / "metrics.json").read_text())["steps"] == 2
    with pytest.raises(ConfigError, match="turn packing off for soft-prompt methods"):
        build_job(config(tiny_llama, "causal_lm", "prompt", qa_jsonl, None, "data.pack=true"), None)
    with pytest.raises(ConfigError, match="data.pack: packing is for causal-LM"):
        load_config(None, ["data.train=x.csv", "data.pack=true"], check_paths=False)
