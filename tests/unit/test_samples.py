"""Held-out answers of a finished run (``inference.sample_answers``, ``deltatune eval --samples``): the run's own
evaluation rows, the tuned model's answer as ``predict`` gives it and the base model's, in samples.jsonl."""

from __future__ import annotations

import json

import pytest
from transformers import set_seed

from deltatune.cli import main
from deltatune.errors import RunError
from deltatune.inference import load_run, sample_answers, write_sample_answers
from deltatune.models import load_model
from deltatune.tasks import registry as tasks
from tests.helpers import config

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(cfg):
    from deltatune.train.run import train

    return train(cfg).path


def _held_out(run) -> list[dict]:
    """The evaluation split as the task's own pipeline makes it from the run's config (the same call training makes)."""
    loaded = load_run(run)
    return tasks.get(loaded.cfg.task)(loaded.cfg).rows().splits["eval"]


def _predict(capsys, run, texts: list[str], *extra: str) -> list[dict]:
    capsys.readouterr()
    args = ["predict", str(run), *[a for t in texts for a in ("--text", t)], *extra]
    assert main(args) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_classification_samples_are_the_held_out_rows_with_predict_and_base_answers(tiny_bert, cls_csv, tmp_path,
                                                                                      capsys):
    run = _train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run", "train.max_steps=6",
                        "train.lr=5e-3"))
    rows = sample_answers(load_run(run), n=4)
    held = _held_out(run)[:4]
    assert [r["prompt"] for r in rows] == [h["text"] for h in held]
    assert [r["reference"] for r in rows] == [h["label"] for h in held]

    tuned = _predict(capsys, run, [r["prompt"] for r in rows])
    assert [r["after"] for r in rows] == [f"{p['label']} ({p['probabilities'][p['label']]:.2f})" for p in tuned]

    # The base: the same weights with a fresh head drawn from the run's seed (what training measured its
    # baseline with; LoRA keeps that head as the one its switched-off delta uses).
    loaded = load_run(run)
    set_seed(loaded.cfg.train.seed)
    base = load_model(tiny_bert, "sequence", loaded.labels, loaded.tokenizer.pad_token_id).eval()
    untouched = loaded.task.predict(base, loaded.tokenizer, [r["prompt"] for r in rows])
    assert [r["before"] for r in rows] == [loaded.task.answer_text(p) for p in untouched]
    assert [r["before"] for r in rows] != [r["after"] for r in rows]


def test_sft_samples_and_eval_writes_them(tiny_llama, qa_jsonl, tmp_path, capsys):
    run = _train(config(tiny_llama, "causal_lm", "lora", qa_jsonl, tmp_path / "lm", "train.max_steps=8",
                        "train.lr=1e-2"))
    capsys.readouterr()
    assert main(["eval", str(run), "--samples", "3"]) == 0, capsys.readouterr().err
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kept = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert printed == kept and len(kept) == 3
    held = _held_out(run)[:3]
    assert [r["prompt"] for r in kept] == [h["prompt"] for h in held]
    assert [r["reference"] for r in kept] == [h["response"] for h in held]
    tuned = _predict(capsys, run, [r["prompt"] for r in kept], "--max-new-tokens", "48")
    assert [r["after"] for r in kept] == [p["response"] for p in tuned]

    loaded = load_run(run)
    base = load_model(tiny_llama, "causal", None, loaded.tokenizer.pad_token_id).eval()
    untouched = loaded.task.predict(base, loaded.tokenizer, [r["prompt"] for r in kept], 48)
    assert [r["before"] for r in kept] == [p["response"] for p in untouched]

    # Its own held-out answers are replaced by a second call (a different N), and --pretty prints a table.
    assert main(["eval", str(run), "--samples", "2", "--pretty"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "after (tuned)" in out and kept[0]["prompt"].split()[0] in out
    assert len((run / "samples.jsonl").read_text().splitlines()) == 2


def test_training_samples_are_kept_and_an_incomplete_run_is_refused(tiny_bert, cls_csv, tmp_path, capsys):
    run = _train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run", "train.max_steps=1"))
    ppo_rows = '{"prompt": "p", "before": "a", "reward_before": 0.1, "after": "b", "reward_after": 0.9}\n'
    (run / "samples.jsonl").write_text(ppo_rows)
    with pytest.raises(RunError, match="training wrote these samples"):
        write_sample_answers(run, 2)
    assert main(["eval", str(run), "--samples", "2"]) != 0
    assert "they are kept" in capsys.readouterr().err
    assert (run / "samples.jsonl").read_text() == ppo_rows

    (run / "samples.jsonl").unlink()
    (run / "metrics.json").unlink()  # the commit record: without it the run is not complete
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    with pytest.raises(RunError, match="not completed; resume it"):
        write_sample_answers(run, 2)
    assert not (run / "samples.jsonl").exists()
    assert main(["eval", str(run), "--samples", "0"]) != 0
    assert "--samples 0: must be at least 1" in capsys.readouterr().err


def test_changed_data_is_refused(tiny_bert, cls_csv, tmp_path):
    run = _train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "run", "train.max_steps=1"))
    cls_csv.write_text(cls_csv.read_text() + "a fine new film,positive\n")
    with pytest.raises(RunError, match="data files changed since training"):
        write_sample_answers(run, 2)
    assert not (run / "samples.jsonl").exists()


@pytest.mark.parametrize("task", ["token_classification", "seq2seq"])
def test_tagging_and_seq2seq_samples(task, tiny_bert, tiny_t5, tagged_jsonl, qa_jsonl, tmp_path):
    model, data = (tiny_bert, tagged_jsonl) if task == "token_classification" else (tiny_t5, qa_jsonl)
    run = _train(config(model, task, "lora", data, tmp_path / "run", "train.max_steps=2"))
    loaded = load_run(run)
    rows = sample_answers(loaded, n=3)
    held = _held_out(run)[:3]
    if task == "token_classification":
        assert [(r["prompt"], r["reference"]) for r in rows] == [(" ".join(h["tokens"]), " ".join(h["tags"]))
                                                                 for h in held]
        tuned = [" ".join(p["tags"]) for p in loaded.task.predict(loaded.model, loaded.tokenizer,
                                                                  [r["prompt"] for r in rows])]
    else:
        assert [(r["prompt"], r["reference"]) for r in rows] == [(h["prompt"], h["response"]) for h in held]
        tuned = [p["response"] for p in loaded.task.predict(loaded.model, loaded.tokenizer,
                                                            [r["prompt"] for r in rows], 48)]
    assert [r["after"] for r in rows] == tuned
