"""`deltatune feedback`: sampled responses ranked by a scripted person or a judge model, written as
preference JSONL that load_preferences reads, resumable after a quit or a crash."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from deltatune.cli import main
from deltatune.data.preferences import load_preferences, to_pairs
from deltatune.errors import DataError, DeltatuneError, RunError
from deltatune.rlhf.feedback import (Outcome, classifier_log_odds, feedback, load_judge, load_sampler, parse_answer,
                                     prompt_ids, read_prompts, sample_responses, skipped_path)

from tests.conftest import sentiment_rows, write_csv, write_jsonl
from tests.helpers import config

PROMPTS = ["what is your name", "hello", "the movie was", "what is 3 and 4"]
SAMPLING = dict(max_new_tokens=6, temperature=0.8, top_p=0.95, seed=0)


class Person:
    """A scripted person: answers in order; fails the test when asked more than it was told."""

    def __init__(self, *answers: str):
        self.answers, self.asked = list(answers), 0

    def __call__(self, question: str) -> str:
        assert self.answers, f"asked once more than scripted:\n{question}"
        self.asked += 1
        return self.answers.pop(0)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])


@pytest.fixture(scope="module")
def sampler(tiny_llama):
    return load_sampler(str(tiny_llama))


def session(prompts: Path, model: Path, out: Path, *answers: str, k: int = 2):
    console = Console(file=io.StringIO(), width=300)
    person = Person(*answers)
    result = feedback(prompts, str(model), out, k, ask=person, console=console, **SAMPLING)
    return result, console.file.getvalue(), person


def candidates(sampler, prompt: str, k: int) -> list[str]:
    return sample_responses(sampler, prompt, k, **SAMPLING)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("answer, n, order, skip", [
    ("2", 2, [1], None), (" 1 ", 2, [0], None), ("2 1", 2, [1, 0], None),
    ("3 1 2", 3, [2, 0, 1], None), ("3,1,2", 3, [2, 0, 1], None), ("2", 3, [1], None),
    ("s", 3, None, "skipped"), ("T", 2, None, "tie or both bad")])
def test_parse_answer(answer, n, order, skip):
    assert parse_answer(answer, n) == Outcome(order=order, skip=skip)


@pytest.mark.parametrize("answer, n, message", [
    ("3", 2, "numbered 1 to 2"), ("0", 3, "numbered 1 to 3"), ("1 2", 3, "each of 1..3 once"),
    ("1 1 2", 3, "each of 1..3 once"), ("best", 2, "1 or 2: the better response"), ("", 3, "a ranking best first")])
def test_parse_answer_rejects_and_says_what_is_valid(answer, n, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_answer(answer, n)
    assert "q: quit" in str(info.value)


def test_quit_is_none():
    assert parse_answer("q", 2) is None


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(sampler):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = candidates(sampler, "hello", 3)
    assert torch.equal(torch.rand(3), expected_next)
    assert candidates(sampler, "hello", 3) == first
    assert len(set(first)) == 3 and all(r and r == r.strip() for r in first)
    assert sample_responses(sampler, "hello", 3, **{**SAMPLING, "seed": 1}) != first


def test_read_prompts_txt_and_column(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n\nthe movie was\n")
    assert [(p.index, p.row, p.text) for p in read_prompts(txt)] == [(0, 1, "hello"), (1, 3, "the movie was")]
    table = write_csv(tmp_path / "p.csv", [{"question": "hello"}, {"question": "hi"}])
    assert [p.text for p in read_prompts(table, "question")] == ["hello", "hi"]
    with pytest.raises(DataError, match="no column 'prompt' .*--prompt-column"):
        read_prompts(table)


# ----------------------------------------------------------------------------- a person

def test_pick_writes_pairs_that_load(prompts_file, tiny_llama, sampler, tmp_path):
    out = tmp_path / "prefs.jsonl"
    result, shown, _ = session(prompts_file, tiny_llama, out, "1", "2", "t", "3", "1")
    assert result == {"answered": 3, "skipped": 1, "remaining": 0, "out": str(out),
                      "skipped_file": str(tmp_path / "prefs.skipped.jsonl")}
    assert "numbered 1 to 2" in shown  # "3" was re-asked
    r = [candidates(sampler, p, 2) for p in PROMPTS]
    prefs = load_preferences(out)
    assert [(p.prompt, p.responses) for p in prefs] == [
        (PROMPTS[0], r[0]), (PROMPTS[1], [r[1][1], r[1][0]]), (PROMPTS[3], r[3])]
    written = rows(out)
    assert [w["source"]["index"] for w in written] == [0, 1, 3]
    assert written[0]["source"] == {"model": str(tiny_llama.resolve()), "seed": 0, "temperature": 0.8, "top_p": 0.95,
                                    "max_new_tokens": 6, "index": 0, "row": 1, "rows": 1}
    skipped = rows(skipped_path(out))
    assert [(s["prompt"], s["skipped"], s["responses"]) for s in skipped] == [(PROMPTS[2], "tie or both bad", r[2])]


def test_rank_or_best_of_three(prompts_file, tiny_llama, sampler, tmp_path):
    out = tmp_path / "prefs.jsonl"
    session(prompts_file, tiny_llama, out, "3 1 2", "2", "s", "x", "1 3 2", k=3)
    r = [candidates(sampler, p, 3) for p in PROMPTS]
    written = rows(out)
    assert written[0]["responses"] == r[0] and written[0]["ranking"] == [2, 0, 1]
    # the best alone: the best against each other response, nothing among the others
    assert [(w["chosen"], w["rejected"], w["source"]["rows"]) for w in written[1:3]] == [
        (r[1][1], r[1][0], 2), (r[1][1], r[1][2], 2)]
    assert to_pairs(load_preferences(out)) == [
        (PROMPTS[0], r[0][2], r[0][0]), (PROMPTS[0], r[0][2], r[0][1]), (PROMPTS[0], r[0][0], r[0][1]),
        (PROMPTS[1], r[1][1], r[1][0]), (PROMPTS[1], r[1][1], r[1][2]),
        (PROMPTS[3], r[3][0], r[3][2]), (PROMPTS[3], r[3][0], r[3][1]), (PROMPTS[3], r[3][2], r[3][1])]


def test_quit_then_resume_asks_the_rest_once(prompts_file, tiny_llama, tmp_path):
    out = tmp_path / "prefs.jsonl"
    first, shown1, _ = session(prompts_file, tiny_llama, out, "1", "s", "q")
    assert first["answered"] == 1 and first["skipped"] == 1 and first["remaining"] == 2
    assert "run the same command to continue" in shown1
    second, shown2, person = session(prompts_file, tiny_llama, out, "2", "1")
    assert person.asked == 2 and second["remaining"] == 0
    assert "2 of 4 prompts done; continuing at prompt 3" in shown2
    assert "prompt 1 of 4" not in shown2 and "prompt 3 of 4" in shown2
    # the resumed session showed prompt 3 the same candidates as the quit one
    prompt3 = shown1[shown1.index("prompt 3 of 4"):]
    assert prompt3.strip() and prompt3[:prompt3.index("answered 1")] in shown2
    indices = [w["source"]["index"] for w in rows(out) + rows(skipped_path(out))]
    assert sorted(indices) == [0, 1, 2, 3]
    assert [p.prompt for p in load_preferences(out)] == [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    third, shown3, person = session(prompts_file, tiny_llama, out)
    assert person.asked == 0 and "all 4 prompts are done" in shown3


def test_torn_last_line_is_dropped_and_asked_again(prompts_file, tiny_llama, tmp_path):
    out = tmp_path / "prefs.jsonl"
    session(prompts_file, tiny_llama, out, "1", "2", "q")
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"prompt": "the movie was", "chos')  # the crash came mid-write
    result, shown, person = session(prompts_file, tiny_llama, out, "1", "1")
    assert "line 3 on is incomplete" in shown and person.asked == 2
    assert out.read_bytes().startswith(whole)
    assert [w["source"]["index"] for w in rows(out)] == [0, 1, 2, 3]
    assert len(load_preferences(out)) == 4


def test_a_prompt_with_only_some_of_its_rows_written_is_asked_again(prompts_file, tiny_llama, sampler, tmp_path):
    out = tmp_path / "prefs.jsonl"
    session(prompts_file, tiny_llama, out, "3 2 1", "1", "q", k=3)  # prompt 2 wrote two pair rows
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))  # the second pair row was lost in the crash
    _, shown, person = session(prompts_file, tiny_llama, out, "2", "s", "s", k=3)
    assert "line 2 on is incomplete" in shown and person.asked == 3
    r1 = candidates(sampler, PROMPTS[1], 3)
    assert [(w["chosen"], w["rejected"]) for w in rows(out)[1:]] == [(r1[1], r1[0]), (r1[1], r1[2])]


def test_changed_prompts_file_is_an_error_naming_the_row(prompts_file, tiny_llama, tmp_path):
    out = tmp_path / "prefs.jsonl"
    session(prompts_file, tiny_llama, out, "1", "1", "q")
    write_jsonl(prompts_file, [{"prompt": p} for p in [PROMPTS[0], "hi", *PROMPTS[2:]]])
    with pytest.raises(DataError, match=r"prompts.jsonl: row 2: the prompt is 'hi' but .*prefs.jsonl line 2 "
                                        r"answered 'hello'.*Restore it, or give a new --out file"):
        session(prompts_file, tiny_llama, out)
    write_jsonl(prompts_file, [{"prompt": PROMPTS[0]}])
    with pytest.raises(DataError, match="has 1 prompts, but .* answered prompt 2"):
        session(prompts_file, tiny_llama, out)


def test_edited_line_in_the_middle_is_an_error(prompts_file, tiny_llama, tmp_path):
    out = tmp_path / "prefs.jsonl"
    session(prompts_file, tiny_llama, out, "1", "1", "q")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("{oops\n" + lines[1])
    with pytest.raises(DataError, match="prefs.jsonl: line 1: not a JSON row"):
        session(prompts_file, tiny_llama, out)


def test_no_terminal_and_no_judge_is_an_error(prompts_file, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = main(["feedback", "--prompts", str(prompts_file), "--model", str(tiny_llama), "--out",
                 str(tmp_path / "p.jsonl")])
    assert code == 2 and "stdin is not a terminal" in capsys.readouterr().err
    with pytest.raises(DeltatuneError, match="JSONL; name it p.jsonl"):
        feedback(prompts_file, str(tiny_llama), tmp_path / "p.csv", ask=Person())


# ----------------------------------------------------------------------------- a judge

@pytest.fixture(scope="module")
def sentiment_run(tiny_bert, tmp_path_factory) -> Path:
    from deltatune.train.run import train

    folder = tmp_path_factory.mktemp("judge")
    data = write_csv(folder / "sentiment.csv", sentiment_rows(32))
    return train(config(tiny_bert, "classification", "lora", data, folder / "run", "train.max_steps=1")).path


def test_classifier_log_odds_match_its_probabilities(sentiment_run):
    from deltatune.inference import load_run, predict as classify

    loaded = load_run(sentiment_run)
    texts = ["the movie was good great", "awful dull plot", "a film"]
    probs = [c["probabilities"]["positive"] for c in classify(loaded, texts)]
    expected = [math.log(p / (1 - p)) for p in probs]
    assert classifier_log_odds(loaded, "positive", texts) == pytest.approx(expected, abs=1e-4)
    negative = classifier_log_odds(loaded, "negative", texts)
    assert negative == pytest.approx([-x for x in expected], abs=1e-4)  # two labels: the odds invert


def test_judge_ranks_by_score_and_writes_the_scores(prompts_file, tiny_llama, sampler, sentiment_run, tmp_path):
    from deltatune.inference import load_run

    out = tmp_path / "judged.jsonl"
    result = feedback(prompts_file, str(tiny_llama), out, 3, judge=str(sentiment_run), judge_label="positive",
                      console=Console(file=io.StringIO()), **SAMPLING)
    assert result["answered"] == 4  # float log-odds of different texts do not tie
    loaded = load_run(sentiment_run)
    for row in rows(out):
        responses = candidates(sampler, row["prompt"], 3)
        scores = classifier_log_odds(loaded, "positive", [f"{row['prompt']} {r}" for r in responses])
        assert row["responses"] == responses and row["scores"] == pytest.approx(scores, abs=1e-5)
        assert row["ranking"] == sorted(range(3), key=lambda i: -scores[i])
        assert row["source"]["judge"] == str(sentiment_run.resolve())
    assert len(load_preferences(out)) == result["answered"]


def test_judge_needs_a_known_label(sentiment_run):
    with pytest.raises(RunError, match="give --judge-label; its labels: negative, positive"):
        load_judge(str(sentiment_run), None)
    with pytest.raises(RunError, match="'happy' is not one of its labels"):
        load_judge(str(sentiment_run), "happy")


def test_a_reward_judge_needs_inference_score(sentiment_run, monkeypatch):
    """A reward-model judge has no labels: --judge-label is a clear error. (inference.score always exists now:
    the check for a deltatune without it went with the task components.)"""
    from dataclasses import replace

    from deltatune import inference

    from deltatune.tasks import registry as tasks

    loaded = inference.load_run(sentiment_run)
    reward_run = replace(loaded, cfg=replace(loaded.cfg, task="reward"), task=tasks.get("reward")(loaded.cfg))
    monkeypatch.setattr(inference, "load_run", lambda path: reward_run)
    with pytest.raises(RunError, match="is a reward model; it has no labels"):
        load_judge(str(sentiment_run), "positive")


def test_a_reward_model_judge(tiny_bert, tiny_llama, sampler, prompts_file, tmp_path):
    from deltatune import inference
    from deltatune.train.run import train

    if not hasattr(inference, "score"):
        pytest.skip("inference.score (reward-model scoring) is not in this checkout yet")
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"what is {i}", "chosen": "good great",
                                                   "rejected": "bad awful"} for i in range(16)])
    run = train(config(tiny_bert, "reward", "lora", data, tmp_path / "rm", "train.max_steps=1")).path
    out = tmp_path / "judged.jsonl"
    feedback(prompts_file, str(tiny_llama), out, 2, judge=str(run), console=Console(file=io.StringIO()), **SAMPLING)
    loaded = inference.load_run(run)
    for row in rows(out):
        assert row["scores"] == pytest.approx(inference.score(loaded, [row["prompt"]] * 2,
                                                              [row["chosen"], row["rejected"]]), abs=1e-5)
        assert row["scores"][0] > row["scores"][1]
        assert {row["chosen"], row["rejected"]} == set(candidates(sampler, row["prompt"], 2))


def test_a_classification_run_cannot_write_responses(sentiment_run):
    with pytest.raises(RunError, match="a classification run cannot write responses"):
        load_sampler(str(sentiment_run))


def test_cli_with_a_judge(tiny_llama, sampler, sentiment_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "pairs.jsonl"
    args = ["feedback", "--prompts", str(prompts), "--model", str(tiny_llama), "--out", str(out), "--max-new-tokens",
            "6", "--judge", str(sentiment_run), "--judge-label", "positive"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    written = rows(out)
    assert len(written) == 2 and not skipped_path(out).exists()
    for row in written:
        responses = candidates(sampler, row["prompt"], 2)
        assert {row["chosen"], row["rejected"]} == set(responses)
        assert row["scores"][0] > row["scores"][1] and row["source"]["rows"] == 1
    assert main(args) == 0 and "all 2 prompts are done" in capsys.readouterr().out


def test_a_causal_lm_run_as_the_model(tiny_llama, prompts_file, tmp_path):
    """A run directory samples from its base model with the trained delta, framed by its chat_template setting."""
    from deltatune.train.run import train
    from tests.conftest import qa_rows

    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(16))
    run = train(config(tiny_llama, "causal_lm", "lora", data, tmp_path / "run", "train.max_steps=1",
                       "eval.forgetting=false", "data.chat_template=false")).path
    out = tmp_path / "prefs.jsonl"
    session(prompts_file, run, out, "2", "q")
    row = rows(out)[0]
    sampler = load_sampler(str(run))
    assert not sampler.chat_template and row["source"]["model"] == str(run.resolve())
    tok = sampler.tokenizer  # no chat template: BOS, then the prompt and a newline, as inference.generate frames it
    expected = [tok.bos_token_id, *tok("hello\n", add_special_tokens=False)["input_ids"]]
    assert prompt_ids(sampler, "hello").tolist() == [expected]
    responses = candidates(sampler, PROMPTS[0], 2)
    assert (row["chosen"], row["rejected"]) == (responses[1], responses[0])
