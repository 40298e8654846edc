"""`deltatune feedback --thumbs`: one sampled response per prompt, called good (u) or bad (d) by a scripted
person, written as the prompt/completion/label JSONL that task kto reads, resumable after a quit or a crash
like the ranking mode (tests/unit/test_feedback.py)."""

from __future__ import annotations

import io
import json
import sys

import pytest
from rich.console import Console

from deltatune.cli import main
from deltatune.data.preferences import load_thumbs
from deltatune.errors import DataError, DeltatuneError
from deltatune.rlhf.feedback import Outcome, feedback, load_sampler, parse_thumb, skipped_path
from tests.conftest import write_jsonl
from tests.helpers import config
from tests.unit.test_feedback import PROMPTS, SAMPLING, Person, candidates, rows


@pytest.fixture
def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)])


@pytest.fixture(scope="module")
def sampler(tiny_llama):
    return load_sampler(str(tiny_llama))


def session(prompts, model, out, *answers: str, k: int | None = None):
    console = Console(file=io.StringIO(), width=300)
    person = Person(*answers)
    result = feedback(prompts, str(model), out, k, thumbs=True, ask=person, console=console, **SAMPLING)
    return result, console.file.getvalue(), person


@pytest.mark.parametrize("answer, outcome", [
    ("u", Outcome(label=True)), (" UP ", Outcome(label=True)), ("d", Outcome(label=False)),
    ("Down", Outcome(label=False)), ("s", Outcome(skip="skipped")), ("q", None)])
def test_parse_thumb(answer, outcome):
    assert parse_thumb(answer) == outcome


@pytest.mark.parametrize("answer", ["1", "", "good", "t"])
def test_parse_thumb_rejects_and_says_what_is_valid(answer):
    with pytest.raises(ValueError, match="u: thumbs up .*d: thumbs down .*s: skip; q: quit"):
        parse_thumb(answer)


def test_thumbs_write_rows_that_kto_reads(prompts_file, tiny_llama, sampler, tmp_path):
    out = tmp_path / "thumbs.jsonl"
    result, shown, person = session(prompts_file, tiny_llama, out, "u", "maybe", "d", "s", "up")
    assert result == {"answered": 3, "skipped": 1, "remaining": 0, "out": str(out),
                      "skipped_file": str(tmp_path / "thumbs.skipped.jsonl")}
    assert person.asked == 5 and "'maybe' is not an answer" in shown  # re-asked
    assert "prompt 1 of 4 (row 1)" in shown and "response" in shown
    one = [candidates(sampler, p, 1) for p in PROMPTS]
    assert all(len(r) == 1 for r in one)
    written = rows(out)
    assert [(w["prompt"], w["completion"], w["label"]) for w in written] == [
        (PROMPTS[0], one[0][0], True), (PROMPTS[1], one[1][0], False), (PROMPTS[3], one[3][0], True)]
    assert list(written[0]) == ["prompt", "completion", "label", "source"]
    assert written[0]["source"] == {"model": str(tiny_llama.resolve()), "seed": 0, "temperature": 0.8, "top_p": 0.95,
                                    "max_new_tokens": 6, "index": 0, "row": 1, "rows": 1}
    thumbs = load_thumbs(out)
    assert [(t.prompt, t.completion, t.desirable) for t in thumbs] == [
        (w["prompt"], w["completion"], w["label"]) for w in written]
    skipped = rows(skipped_path(out))
    assert [(s["prompt"], s["skipped"], s["responses"]) for s in skipped] == [(PROMPTS[2], "skipped", one[2])]


def test_quit_then_resume_asks_the_rest_once(prompts_file, tiny_llama, tmp_path):
    out = tmp_path / "thumbs.jsonl"
    first, shown1, _ = session(prompts_file, tiny_llama, out, "d", "q")
    assert first["answered"] == 1 and first["remaining"] == 3 and "run the same command to continue" in shown1
    second, shown2, person = session(prompts_file, tiny_llama, out, "u", "s", "d")
    assert person.asked == 3 and second["remaining"] == 0
    assert "1 of 4 prompts done; continuing at prompt 2" in shown2 and "prompt 1 of 4" not in shown2
    # the resumed session showed prompt 2 the same response as the quit one
    prompt2 = shown1[shown1.index("prompt 2 of 4"):]
    assert prompt2.strip() and prompt2[:prompt2.index("answered 1")] in shown2
    assert [(w["source"]["index"], w["label"]) for w in rows(out)] == [(0, False), (1, True), (3, False)]
    assert [t.desirable for t in load_thumbs(out)] == [False, True, False]
    third, shown3, person = session(prompts_file, tiny_llama, out)
    assert person.asked == 0 and "all 4 prompts are done" in shown3


def test_torn_last_line_is_dropped_and_asked_again(prompts_file, tiny_llama, tmp_path):
    out = tmp_path / "thumbs.jsonl"
    session(prompts_file, tiny_llama, out, "u", "d", "q")
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"prompt": "the movie was", "compl')  # the crash came mid-write
    result, shown, person = session(prompts_file, tiny_llama, out, "u", "u")
    assert "line 3 on is incomplete" in shown and person.asked == 2
    assert out.read_bytes().startswith(whole)
    assert [w["source"]["index"] for w in rows(out)] == [0, 1, 2, 3] and len(load_thumbs(out)) == 4


def test_one_file_holds_one_kind_of_row(prompts_file, tiny_llama, tmp_path):
    thumbs, pairs = tmp_path / "thumbs.jsonl", tmp_path / "pairs.jsonl"
    session(prompts_file, tiny_llama, thumbs, "u", "q")
    with pytest.raises(DataError, match=r"thumbs.jsonl: line 1: the file holds thumbs rows of an earlier session, "
                                        r"and this one runs without --thumbs.*Give a new --out file"):
        feedback(prompts_file, str(tiny_llama), thumbs, 2, ask=Person(), console=Console(file=io.StringIO()),
                 **SAMPLING)
    feedback(prompts_file, str(tiny_llama), pairs, 2, ask=Person("1", "q"), console=Console(file=io.StringIO()),
             **SAMPLING)
    with pytest.raises(DataError, match="pairs.jsonl: line 1: the file holds pairs or rankings of an earlier "
                                        "session, and this one runs with --thumbs"):
        session(prompts_file, tiny_llama, pairs)


def test_options_that_do_not_go_with_thumbs(prompts_file, tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t.jsonl"
    with pytest.raises(DeltatuneError, match="--thumbs: a person judges one response per prompt, up or down; "
                                             "drop --k 2"):
        session(prompts_file, tiny_llama, out, k=2)
    with pytest.raises(DeltatuneError, match="drop --judge"):
        feedback(prompts_file, str(tiny_llama), out, thumbs=True, judge="some-run", ask=Person())
    with pytest.raises(DeltatuneError, match=r"--k 1: a preference compares at least 2 responses \(one response, "
                                             r"up or down: --thumbs\)"):
        feedback(prompts_file, str(tiny_llama), out, 1, ask=Person())
    assert session(prompts_file, tiny_llama, out, "q", k=1)[0]["answered"] == 0  # --k 1 is what --thumbs means
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = main(["feedback", "--thumbs", "--prompts", str(prompts_file), "--model", str(tiny_llama), "--out",
                 str(out)])
    assert code == 2 and "feedback --thumbs: stdin is not a terminal" in capsys.readouterr().err


class Terminal(io.StringIO):
    """Typed answers on a terminal."""

    def isatty(self) -> bool:
        return True


def test_cli_thumbs_then_kto_trains_on_the_file(tiny_llama, sampler, tmp_path, monkeypatch, capsys):
    from deltatune.train.run import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "thumbs.jsonl"
    monkeypatch.setattr(sys, "stdin", Terminal("u\nd\nd\nu\n"))
    args = ["feedback", "--thumbs", "--prompts", str(prompts), "--model", str(tiny_llama), "--out", str(out),
            "--max-new-tokens", "6"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith(str(out))
    written = rows(out)
    assert [w["label"] for w in written] == [True, False, False, True]
    assert [w["completion"] for w in written] == [candidates(sampler, p, 1)[0] for p in PROMPTS]
    run = train(config(tiny_llama, "kto", "lora", out, tmp_path / "run", "train.max_steps=1",
                       "data.eval_fraction=0.5"))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["eval"]["rows"] == 2
