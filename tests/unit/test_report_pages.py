"""The pages written for people (data_report.html, compare's report.html): numbers formatted, plain labels
with their raw key beside them, no raw JSON in cells, plots with both axes titled, a banner when a run
shared the machine; well-formed and self-contained."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from deltatune import html_report as hr
from deltatune.compare import Budget, analyse, render
from deltatune.data.report import render_html


class _Page(HTMLParser):
    VOID = {"meta", "br", "img"}

    def __init__(self):
        super().__init__()
        self.stack, self.external, self.texts, self.inside = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.external += [v for k, v in attrs if k in ("src", "href")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"</{tag}> closes nothing open"

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "text":  # SVG text: axis titles and tick labels
            self.texts.append(data)


def _parsed(page: str) -> _Page:
    parsed = _Page()
    parsed.feed(page)
    assert parsed.stack == [] and not parsed.external  # well-formed and self-contained
    return parsed


REPORT = {  # as build_report writes it (a causal LM run's, trimmed)
    "name": "smollm2-135m-causal_lm-lora", "written": "2026-12-01T17:27:05", "task": "causal_lm", "mode": "sft",
    "files": {"train": "/data/chatterbot.jsonl"}, "columns": ["prompt", "response"], "rows_in": 2026, "rows_out": 490,
    "rows_per_split": {"train": 400, "eval": 90, "test": 0}, "rejected_rows": 0,
    "missing_handled": {"dropped": {}, "filled": {}, "total": 0}, "length_filtered": 0, "control_chars_stripped": 0,
    "exact_duplicates_removed": 1128, "near_duplicates_removed": 0,
    "duplicates_by_split": {"train": {"exact": 1128, "near": 0}, "eval": {"exact": 0, "near": 0}},
    "conflicting_labels": 0, "leakage_found": {"eval": {"exact": 13}, "test": {}}, "leakage_removed": 13,
    "leaks": [{"split": "eval", "kind": "exact", "file": "/data/chatterbot.jsonl", "row": 101,
               "train_file": "/data/chatterbot.jsonl", "train_row": 86}],
    "pii_redacted": {"email": 2}, "augmented_rows": 0, "augmented_by_kind": {}, "left_out_by_limits": 395,
    "label_counts": {"train": {"negative": 100, "positive": 300, "neutral": 0}},
    "token_lengths": {"train": {"p50": 16, "p90": 43, "p95": 71, "p99": 142, "min": 6, "max": 277, "mean": 24.3,
                                "histogram": {"edges": [6.0, 73.8, 141.5, 209.2, 277.0], "counts": [380, 14, 5, 1]}}},
    "fingerprint": "c606551a", "settings": {"train_limit": 400, "eval_limit": 100, "dedup": {"leakage": "remove"}},
}


def test_numbers_are_formatted_for_people():
    assert hr.count(22713986) == "22,713,986"
    assert hr.percent(1424, 4000) == "35.6 %" and hr.percent(770, 22713986) == "0.0034 %" and hr.percent(1, 1) == "100 %"
    assert hr.size(90868837) == "90.9 MB" and hr.size(3080) == "3.08 kB" and hr.size(956000) == "0.956 MB"
    assert hr.value(24.3) == "24.3" and hr.value(2026) == "2,026" and "none" in hr.value({})
    page = render_html(REPORT)
    assert "Of 2,026 rows read, 490 (24.2 %) were kept: 400 train, 90 eval." in page
    assert ">1,128<" in page and "2026-12-01 17:27" in page and "smollm2-135m-causal_lm-lora" in page


def test_data_report_labels_are_plain_words_with_the_key_beside_them():
    page = render_html(REPORT)
    _parsed(page)
    assert 'Rows dropped as exact duplicates<code class="key">exact_duplicates_removed</code>' in page
    for key in ("rows_in", "left_out_by_limits", "leakage_found", "pii_redacted", "mode"):
        assert f'<code class="key">{key}</code>' in page
    assert not re.search(r"<td[^>]*>\s*[{\[]", page)  # no raw JSON dict or list in a cell
    assert "{&quot;" not in page and '{"' not in page.split("<body>")[1]
    # what the sections mean, in a line each
    assert "13 eval rows repeat a training row (13 exactly): removed." in page
    assert "the largest class (positive, 300) is 3.0x the smallest" not in page  # neutral has none
    assert "the class neutral has no rows" in page
    assert "a prompt and its response (the model learns the response) (sft)" in page  # the row format, explained


def test_label_balance_says_how_much_larger_the_largest_class_is():
    page = render_html({**REPORT, "label_counts": {"train": {"a": 210, "b": 100}, "eval": {"a": 50, "b": 50}}})
    assert "train: the largest class (a, 210) is 2.1x the smallest (b, 100)" in page
    assert "eval: balanced, 2 classes of 50 rows each" in page


def test_the_length_histogram_has_both_axes_titled_and_integer_ticks():
    texts = _parsed(render_html(REPORT)).texts
    assert "tokens per row" in texts and "rows" in texts  # x and y axis titles
    ticks = [t for t in texts if re.fullmatch(r"[\d,.]+", t)]
    assert ticks and all(re.fullmatch(r"[\d,]+", t) for t in ticks)  # whole numbers, not "73.0 tok"
    assert "300" in ticks and "0" in ticks  # the count axis reaches the tallest bar (380 rows)


def test_an_older_report_without_name_or_date_still_renders():
    old = {k: v for k, v in REPORT.items() if k not in ("name", "written", "settings", "leaks")}
    page = render_html(old, name="my-run")
    _parsed(page)
    assert "my-run" in page and "Rendered:" in page


def _results(tmp_path, contended: set[tuple[str, int]]) -> list[dict]:
    out = []
    for method, accuracy, params in (("lora", 0.8, 338690), ("bitfit", 0.7, 26882)):
        runs = []
        for seed in (43, 44):
            metrics = {"eval": {"accuracy": accuracy + (seed - 43) / 100, "loss": 0.5},
                       "baseline": {"accuracy": 0.5}, "main_metric": {"name": "accuracy", "maximize": True},
                       "trainable_params": params, "total_params": 22713986, "train_seconds": 20.0 + seed - 43,
                       "peak_rss_mb": 1509.4, "machine_load": {"contended": (method, seed) in contended}}
            runs.append({"seed": seed, "run": str(tmp_path / "cmp" / method / f"seed-{seed - 42}"), "metrics": metrics,
                         "delta_bytes": params * 4, "curve": [(1, 0.7), (2, 0.6), (3, 0.5)]})
        out.append({"method": method, "lr": 1e-3, "lr_choice": "config", "runs": runs})
    return out


def test_compare_report_warns_in_a_banner_when_a_run_shared_the_machine(tmp_path):
    results = _results(tmp_path, {("bitfit", 44)})
    page = render(results, analyse(results), Budget(trials=0, seeds=2))
    _parsed(page)
    banner = re.search(r'<div class="banner"[^>]*>(.*?)</div>', page)
    assert banner and "1 run shared the machine" in banner.group(1) and "bitfit seed 44" in banner.group(1)
    assert page.index('class="banner"') < page.index("class='pick'")  # at the top, before the verdict
    quiet = _results(tmp_path, set())
    assert 'class="banner"' not in render(quiet, analyse(quiet), Budget(trials=0, seeds=2))


def test_compare_report_has_a_title_its_folder_formatted_numbers_and_titled_axes(tmp_path):
    results = _results(tmp_path, set())
    page = render(results, analyse(results), Budget(trials=0, seeds=2))
    parsed = _parsed(page)
    assert "<title>deltatune method comparison</title>" in page
    assert f"Folder: <b>{tmp_path / 'cmp'}</b>" in page
    assert "<td>338,690</td>" in page and "<td>1.49 %</td>" in page and "<td>1.35 MB</td>" in page
    assert "<td>1,509 MB</td>" in page and "<td>20.5 s</td>" in page
    for title in ("trainable parameters (log scale)", "accuracy (higher is better)", "optimizer step", "training loss"):
        assert title in parsed.texts
    assert "<b>lora</b> has the best mean accuracy" in page


@pytest.mark.parametrize("low,high,integer,expected", [(0, 380, True, [0, 100, 200, 300, 400]),
                                                       (6, 277, True, [0, 100, 200, 300]),
                                                       (0.6, 0.8, False, [0.6, 0.65, 0.7, 0.75, 0.8])])
def test_axis_ticks_are_round_numbers_that_cover_the_data(low, high, integer, expected):
    assert hr.ticks(low, high, 5, integer) == pytest.approx(expected)


def test_a_preference_report_renders_its_own_figures():
    report = {"task": "dpo", "mode": "preferences", "files": {"train": "/data/prefs.jsonl"},
              "columns": ["prompt", "responses"], "rows_in": 24, "rows_out": 24, "rows_per_split": {"train": 21, "eval": 3},
              "comparisons_per_split": {"train": 21, "eval": 3}, "rejected_rows": 0, "missing_handled": {},
              "length_filtered": 0, "exact_duplicates_removed": 0, "near_duplicates_removed": 0, "conflicting_labels": 0,
              "leakage_found": {"eval": {"prompt_in_train": 2}}, "leakage_removed": 0, "pii_redacted": {},
              "augmented_rows": 0, "augmented_by_kind": {}, "left_out_by_limits": 0, "label_counts": {},
              "token_lengths": {}, "fingerprint": "ab12", "settings": {}}
    page = render_html(report)
    _parsed(page)
    assert "2 eval rows repeat a training row (2 by its prompt): reported, not removed" in page
    assert '<code class="key">comparisons_per_split</code>' in page and "ranked from best to worst" in page


def test_every_run_s_data_report_names_the_run_and_when_it_was_written(tiny_llama, tmp_path, capsys):
    """Preference runs build their report elsewhere than the pipeline's: the page still says whose it is."""
    from deltatune.cli import main
    from tests.conftest import write_jsonl
    from tests.helpers import QUICK
    from tests.unit.test_reward_dpo import preference_rows

    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(24))
    run = tmp_path / "run"
    assert main(["train", f"model={tiny_llama}", "task=dpo", f"data.train={prefs}", "method.name=lora", *QUICK,
                 "train.max_steps=1", "name=my-prefs", f"output_dir={run}"]) == 0
    page = (run / "data_report.html").read_text()
    assert "my-prefs" in page and "Written" in page and "Rendered" not in page
