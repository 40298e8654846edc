"""`deltatune compare`: every method trains, the report is valid HTML with its plots embedded."""

import json
import re
from pathlib import Path
from html.parser import HTMLParser

import pytest
import yaml

from deltatune import registry_db
from deltatune.cli import main
from deltatune.compare import pareto


class _Page(HTMLParser):
    VOID = {"meta", "br", "img"}

    def __init__(self):
        super().__init__()
        self.stack, self.counts, self.external = [], {}, []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.external += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> closes nothing open"


def test_compare_searches_each_method_s_rate_trains_seeds_and_tests_the_differences(tiny_bert, cls_csv, tmp_path):
    from deltatune.methods import registry

    out = tmp_path / "cmp"
    code = main(["compare", f"model={tiny_bert}", f"data.train={cls_csv}", "train.batch_size=8", "train.max_steps=4",
                 "train.eval_every=2", "--methods", "lora,bitfit,houlsby,nosuch", "--trials", "2", "--seeds", "2",
                 "--out", str(out)])
    assert code == 0
    saved = json.loads((out / "results.json").read_text())
    results, analysis = saved["methods"], saved["analysis"]
    assert saved["budget"] == {"trials": 2, "seeds": 2, "resamples": 2000}
    assert [r["method"] for r in results] == ["lora", "bitfit", "houlsby", "nosuch"]
    assert "unknown method 'nosuch'" in results[3]["error"]
    for entry in results[:3]:
        default = registry.get(entry["method"]).default_lr
        # the method's own default first, then 3x; the chosen rate is one of them and trained the seeds
        assert [t["lr"] for t in entry["search"]] == pytest.approx([default, 3 * default])
        assert entry["lr"] in [t["lr"] for t in entry["search"]]
        assert [(r["seed"], Path(r["run"]).name) for r in entry["runs"]] == [(43, "seed-1"), (44, "seed-2")]
        for r in entry["runs"]:
            cfg = yaml.safe_load((Path(r["run"]) / "config.yaml").read_text())
            assert cfg["train"]["lr"] == pytest.approx(entry["lr"]) and cfg["train"]["seed"] == r["seed"]
    assert analysis["paired"] and analysis["metric"] == "accuracy"
    best = analysis["best"]
    for name, s in analysis["methods"].items():
        values = [r["metrics"]["eval"]["accuracy"] for e in results if e["method"] == name for r in e["runs"]]
        assert s["values"] == values and s["mean"] == pytest.approx(sum(values) / 2)
        assert s["ci"][0] <= s["mean"] + 1e-9 and s["mean"] - 1e-9 <= s["ci"][1]
        assert ("vs_best" in s) == (name != best)
    assert analysis["recommendation"].startswith("Pick ")
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert page.stack == [] and not page.external  # well-formed and self-contained
    assert page.counts["svg"] == 2 and page.counts["circle"] == 3 and page.counts["polyline"] >= 3
    assert page.counts["table"] == 2 + 1 + 3  # results and costs, the searches and one confusion matrix per method
    recorded = registry_db.list_runs(kind="compare")
    assert sorted(r["method"] for r in recorded) == ["bitfit", "bitfit", "houlsby", "houlsby", "lora", "lora"]
    assert len(registry_db.list_runs(kind="trial")) == 6


def test_pareto_front():
    # (params, accuracy): c is dominated by a (fewer params, better); d ties b on both -> both stay
    points = [(10, 0.8), (100, 0.9), (50, 0.7), (100, 0.9), (1000, 0.95)]
    assert pareto(points, higher_better=True) == [0, 1, 3, 4]
    assert pareto([(10, 5.0), (20, 4.0), (30, 6.0)], higher_better=False) == [0, 1]


def test_method_options_in_the_base_config_apply_to_their_method_only(tiny_bert, cls_csv, tmp_path):
    base = tmp_path / "lora.yaml"
    base.write_text(f"model: {tiny_bert}\ndata: {{train: {cls_csv}}}\nmethod: {{name: lora, r: 2, alpha: 4}}\n"
                    "train: {batch_size: 8, max_steps: 2, progress: false}\n")
    out = tmp_path / "cmp"
    once = ["--trials", "0", "--seeds", "1"]
    assert main(["compare", str(base), "--methods", "lora,bitfit", "--out", str(out), *once]) == 0
    results = json.loads((out / "results.json").read_text())["methods"]
    assert [r.get("error") for r in results] == [None, None]
    saved = {r["method"]: yaml.safe_load((Path(r["runs"][0]["run"]) / "config.yaml").read_text())["method"]
             for r in results}
    assert saved["lora"]["r"] == 2 and saved["lora"]["alpha"] == 4
    assert "r" not in saved["bitfit"]

    (out / "report.html").unlink()  # the same command again: both runs completed, nothing is retrained
    before = sorted(p.name for p in out.iterdir())
    assert main(["compare", str(base), "--methods", "lora,bitfit", "--out", str(out), *once]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == results
    assert sorted(p.name for p in out.iterdir()) == sorted(before + ["report.html"])


def test_a_bake_off_cut_short_goes_on_from_the_interrupted_method(tiny_bert, cls_csv, tmp_path, capsys):
    import pytest

    from deltatune.configure import load_config
    from deltatune.train.run import train

    out = tmp_path / "cmp"
    common = [f"model={tiny_bert}", f"data.train={cls_csv}", "train.batch_size=8", "train.max_steps=4",
              "train.save_every=1"]

    def interrupt(state):
        if state.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # as compare trains it, stopped at step 2
        train(load_config(None, [*common, "method.name=lora", "train.seed=43", f"output_dir={out / 'lora' / 'seed-1'}",
                                 "train.progress=false"]), callbacks=(interrupt,))
    assert main(["compare", *common, "--methods", "lora,bitfit", "--out", str(out), "--trials", "0", "--seeds", "1"]) == 0
    assert re.search(r"lora +seed-1 \(train.seed 43\): resuming the run", capsys.readouterr().err)
    results = json.loads((out / "results.json").read_text())["methods"]
    assert [r["method"] for r in results] == ["lora", "bitfit"] and not any("error" in r["runs"][0] for r in results)
    log = [json.loads(line) for line in (out / "lora" / "seed-1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]


def test_a_rerun_that_chooses_another_rate_never_reuses_runs_trained_at_the_old_one(tiny_bert, cls_csv, tmp_path):
    out = tmp_path / "cmp"
    common = ["compare", f"model={tiny_bert}", f"data.train={cls_csv}", "train.batch_size=8", "train.max_steps=2"]
    flags = ["--methods", "lora", "--seeds", "1", "--out", str(out)]
    assert main([*common, "train.lr=1e-3", *flags, "--trials", "0"]) == 0
    first = (out / "lora" / "seed-1" / "metrics.json").read_bytes()
    assert main([*common, *flags, "--trials", "1"]) == 0  # the search's only trial: lora's default, 5e-4
    entry = json.loads((out / "results.json").read_text())["methods"][0]
    assert entry["lr"] == pytest.approx(5e-4)
    assert "trained at learning rate 0.001, but this comparison chose 0.0005" in entry["runs"][0]["error"]
    assert (out / "lora" / "seed-1" / "metrics.json").read_bytes() == first  # never overwritten
