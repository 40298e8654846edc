"""Collect preference data: sample k responses per prompt and let a person (or a judge model) rank them;
or (``thumbs``) one response per prompt that a person calls good or bad, for task kto.

Every answered prompt is appended to the output JSONL at once (write, flush, fsync), in the row
shapes ``data.preferences.load_preferences`` reads, plus a ``source`` field:

- two responses, the person picks one:   ``{"prompt", "chosen", "rejected", "source"}``
- k > 2 responses, a full ranking:       ``{"prompt", "responses", "ranking", "source"}``
- k > 2 responses, only the best picked: k-1 pair rows, the best against each other response.
  Nothing is said about the order of the others, so no pair is made among them.
- a judge ranks fully (a pair for k=2, a ranking for k>2) and adds ``scores``: the judge's score of
  each response, in the order of ``responses`` (ranking rows) or ``[chosen, rejected]`` (pairs).
- thumbs (one response, up or down):     ``{"prompt", "completion", "label", "source"}``, ``label`` true for
  a thumbs up; the rows ``data.preferences.load_thumbs`` reads (task kto). A file holds one kind of row:
  a thumbs session does not go on in a file of pairs and rankings, nor a ranking session in one of thumbs.

``source`` is ``{"model", "seed", "temperature", "top_p", "max_new_tokens", "index", "row", "rows"}``
(``index``: the prompt's 0-based position in the prompts file; ``row``: where it is in the file;
``rows``: how many output rows the prompt wrote), plus ``"judge"`` when a model ranked.

Skipped prompts (``s``; ``t`` for a tie or both bad; a judge's tie; a model that gave fewer than
two different responses, or with thumbs no non-empty one) go to ``OUT.skipped.jsonl`` (``OUT`` without its ``.jsonl``) with the
reason, so the preference file stays loadable and a resumed session does not ask again.

Resume: run the same command again. A last line cut off by a crash (or a prompt whose rows were
not all written) is reported and dropped; that prompt is asked again. Sampling is seeded by the
seed and the prompt text, so a resumed session shows the same candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from ..assets import DATA_SUFFIXES, resolve_data
from ..errors import DataError, DeltatuneError, RunError
from ..data.load import ROW, cell, load_table, require_columns
from ..tasks import registry as tasks
from .rewards import log_odds

SAMPLING_ROUNDS = 4  # draws of k samples to find k different responses before showing fewer


@dataclass
class Prompt:
    index: int  # 0-based position among the file's prompts
    row: int  # as the user finds it in the file (line number, or record number)
    text: str


@dataclass
class Outcome:
    """What was decided about one prompt's responses."""
    order: list[int] | None = None  # indices into the responses, best first: all of them, or only the best
    skip: str | None = None  # why no preference was recorded
    scores: list[float] | None = None  # a judge's score per response
    label: bool | None = None  # thumbs: the one response is desirable (up) or not (down)


Decide = Callable[[Prompt, list[str]], "Outcome | None"]  # None: the person quit


# ----------------------------------------------------------------------------- prompts

def read_prompts(path: str | Path, column: str = "prompt") -> list[Prompt]:
    """Prompts from a table (CSV, TSV, JSON, JSONL, Parquet, a `datasets` folder) or a .txt file,
    one prompt per line (blank lines are not prompts)."""
    path = resolve_data(str(path))  # a packaged data set by name (chatterbot) too
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: file does not exist")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: bytes that are not UTF-8 at byte {exc.start}; re-save it as UTF-8") from exc
        found = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    elif path.is_dir() or path.suffix.lower() in DATA_SUFFIXES:
        rows = load_table(path)
        require_columns(rows, str(path), [(column, "--prompt-column")])
        found = [(row[ROW], cell(row, column, str(path), "prompt")) for row in rows]
    else:
        raise DataError(f"{path}: unsupported prompts file {path.suffix!r}; use .txt (one prompt per line) or a "
                        f"table ({', '.join(DATA_SUFFIXES)}) with a {column!r} column")
    if not found:
        raise DataError(f"{path}: no prompts")
    return [Prompt(i, row, text) for i, (row, text) in enumerate(found)]


# ----------------------------------------------------------------------------- sampling

@dataclass
class Sampler:
    """A causal LM and how its prompts are framed."""
    model: torch.nn.Module
    tokenizer: object
    chat_template: bool
    name: str


def load_sampler(ref: str) -> Sampler:
    """A run directory (its base model + delta) or a base model (a local folder or a packaged alias)."""
    from accelerate import PartialState

    from ..inference import load_run
    from ..models import load_model, load_tokenizer

    if (Path(ref) / "config.yaml").is_file():
        loaded = load_run(ref)
        if not loaded.task.generates:
            writers = [name for name in tasks.names() if tasks.get(name).generates]
            raise RunError(f"{ref}: a {loaded.cfg.task} run cannot write responses; give a run of task "
                           f"{', '.join(writers)} or a base model (folder or alias)")
        return Sampler(loaded.model, loaded.tokenizer, loaded.cfg.data.chat_template, str(Path(ref).resolve()))
    from ..assets import resolve_model

    path = resolve_model(ref)
    tokenizer = load_tokenizer(path)
    model = load_model(path, "causal", pad_token_id=tokenizer.pad_token_id).to(PartialState().device).eval()
    name = ref if not Path(ref).exists() else str(Path(ref).resolve())
    return Sampler(model, tokenizer, True, name)


def prompt_ids(sampler: Sampler, prompt: str) -> torch.Tensor:
    """Token ids the model answers, framed as ``inference.generate`` frames them."""
    from ..data.examples import prompt_ids as framed

    return torch.tensor([framed(sampler.tokenizer, prompt, sampler.chat_template)])


# torch's default generator is one per process, shared by its threads: two samplers seeding and drawing from it
# at once (the studio's sessions, the studio and a command in one process) would draw each other's numbers.
SEEDED_SAMPLING = threading.Lock()


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt: the same seed and prompt text give the same responses."""
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def sample_responses(sampler: Sampler, prompt: str, k: int, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int) -> list[str]:
    """Up to k different non-empty responses, in the order they were sampled.

    Identical or empty responses cannot be a preference (load_preferences rejects them), so a
    duplicate is drawn again, for at most SAMPLING_ROUNDS batches of k; a model that keeps
    repeating itself yields fewer than k."""
    tok = sampler.tokenizer
    ids = prompt_ids(sampler, prompt).to(next(sampler.model.parameters()).device)
    found: list[str] = []
    with SEEDED_SAMPLING, torch.random.fork_rng():  # one seeded sampler at a time; the caller's state kept
        torch.manual_seed(prompt_seed(seed, prompt))
        for _ in range(SAMPLING_ROUNDS):
            out = sampler.model.generate(input_ids=ids.expand(k, -1), attention_mask=torch.ones_like(ids).expand(k, -1),
                                         do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                         max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            for seq in out[:, ids.shape[1]:]:
                text = tok.decode(seq, skip_special_tokens=True).strip()
                if text and text not in found:
                    found.append(text)
                if len(found) == k:
                    return found
    return found


# ----------------------------------------------------------------------------- judges

@dataclass
class Judge:
    name: str
    score: Callable[[list[str], list[str]], list[float]]  # (prompts, responses) -> one score each


def load_judge(path: str, label: str | None) -> Judge:
    """A classification run (score: log-odds of ``label``) or a reward-model run (its reward)."""
    from .. import inference

    loaded = inference.load_run(path)
    task = loaded.cfg.task
    if loaded.task.one_label_per_text:
        if label not in (loaded.labels or []):
            given = f"--judge-label {label!r} is not one of its labels" if label else "give --judge-label"
            raise RunError(f"{path}: a classification judge scores the log-odds of one label: {given}; its labels: "
                           f"{', '.join(loaded.labels or [])}")
        loaded.tokenizer.truncation_side = "left"  # a long prompt must not push the response out
        return Judge(str(Path(path).resolve()),
                     lambda prompts, responses: classifier_log_odds(loaded, label, joined(prompts, responses)))
    if loaded.task.scores_responses:
        if label is not None:
            raise RunError(f"--judge-label {label!r}: {path} is a reward model; it has no labels, drop --judge-label")
        return Judge(str(Path(path).resolve()),
                     lambda prompts, responses: [float(s) for s in inference.score(loaded, prompts, responses)])
    raise RunError(f"{path}: a {task} run cannot judge responses; give a classification run (with --judge-label) "
                   "or a reward-model run")


def joined(prompts: list[str], responses: list[str]) -> list[str]:
    """The text a classifier judges: the prompt and the response, as a reader sees them."""
    return [f"{p} {r}".strip() for p, r in zip(prompts, responses)]


@torch.no_grad()
def classifier_log_odds(loaded, label: str, texts: list[str]) -> list[float]:
    """log p(label) - log(1 - p(label)), from the logits: z_y - logsumexp(z_j for j != y)."""
    y = loaded.labels.index(label)
    enc = loaded.tokenizer(texts, truncation=True, max_length=loaded.cfg.train.max_length, padding=True,
                           return_tensors="pt").to(loaded.device)
    logits = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    return log_odds(logits, y).cpu().tolist()


def judge_decider(judge: Judge, console: Console) -> Decide:
    def decide(prompt: Prompt, responses: list[str]) -> Outcome:
        scores = judge.score([prompt.text] * len(responses), responses)
        if len(set(scores)) < len(scores):
            return Outcome(skip="judge: tie (equal scores)", scores=scores)
        order = sorted(range(len(responses)), key=lambda i: -scores[i])
        console.print(f"prompt {prompt.index + 1} (row {prompt.row}): "
                      + " > ".join(f"{i + 1} ({scores[i]:.3f})" for i in order))
        return Outcome(order=order, scores=scores)
    return decide


# ----------------------------------------------------------------------------- the person

def usage(n: int) -> str:
    pick = "1 or 2: the better response" if n == 2 else (
        f"a ranking best first using each of 1..{n} once (e.g. '{' '.join(map(str, range(n, 0, -1)))}'), "
        "or one number: the best")
    return f"{pick}; t: tie or both bad (skip); s: skip; q: quit"


def parse_answer(answer: str, n: int) -> Outcome | None:
    """A person's answer about n responses: an Outcome, None to quit; ValueError saying what is valid."""
    text = answer.strip().lower()
    if text in ("q", "quit"):
        return None
    if text in ("s", "skip"):
        return Outcome(skip="skipped")
    if text in ("t", "tie"):
        return Outcome(skip="tie or both bad")
    parts = text.replace(",", " ").split()
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"{answer!r} is not an answer; type {usage(n)}")
    numbers = [int(p) for p in parts]
    if any(not 1 <= x <= n for x in numbers):
        raise ValueError(f"{answer!r}: responses are numbered 1 to {n}; type {usage(n)}")
    if len(numbers) not in (1, n) or len(set(numbers)) != len(numbers):
        raise ValueError(f"{answer!r}: give one number (the best) or each of 1..{n} once; type {usage(n)}")
    return Outcome(order=[x - 1 for x in numbers])


THUMBS_USAGE = "u: thumbs up (a good response); d: thumbs down (a bad one); s: skip; q: quit"


def parse_thumb(answer: str) -> Outcome | None:
    """A person's thumbs up or down on one response: an Outcome, None to quit; ValueError saying what is valid."""
    text = answer.strip().lower()
    if text in ("q", "quit"):
        return None
    if text in ("s", "skip"):
        return Outcome(skip="skipped")
    if text in ("u", "up", "d", "down"):
        return Outcome(label=text.startswith("u"))
    raise ValueError(f"{answer!r} is not an answer; type {THUMBS_USAGE}")


def person_decider(ask: Callable[[str], str], console: Console, total: int, thumbs: bool = False) -> Decide:
    """Shows the prompt and numbered responses (``thumbs``: the one response) on ``console``; reads answers
    with ``ask``."""
    def decide(prompt: Prompt, responses: list[str]) -> Outcome | None:
        console.print(Panel(Text(prompt.text), title=f"prompt {prompt.index + 1} of {total} (row {prompt.row})"))
        for number, response in enumerate(responses, start=1):
            console.print(Panel(Text(response), title="response" if thumbs else str(number), title_align="left"))
        while True:
            try:
                answer = ask(f"{THUMBS_USAGE if thumbs else usage(len(responses))}\n> ")
            except (EOFError, KeyboardInterrupt):
                return None
            try:
                return parse_thumb(answer) if thumbs else parse_answer(answer, len(responses))
            except ValueError as exc:
                console.print(Text(str(exc), style="red"))
    return decide


# ----------------------------------------------------------------------------- the files

def skipped_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(".jsonl")] + ".skipped.jsonl")


def output_rows(prompt: Prompt, responses: list[str], outcome: Outcome, source: dict) -> list[dict]:
    """The preference rows an outcome implies (see the module docstring)."""
    order, scores = outcome.order, outcome.scores
    if outcome.label is not None:
        rows = [{"prompt": prompt.text, "completion": responses[0], "label": outcome.label}]
    elif len(order) == len(responses) and len(responses) > 2:
        rows = [{"prompt": prompt.text, "responses": responses, "ranking": order}]
        if scores is not None:
            rows[0]["scores"] = scores
    else:
        best = order[0]
        rows = [{"prompt": prompt.text, "chosen": responses[best], "rejected": responses[other]}
                for other in range(len(responses)) if other != best]
        if scores is not None:
            for row, other in zip(rows, [i for i in range(len(responses)) if i != best]):
                row["scores"] = [scores[best], scores[other]]
    return [{**row, "source": {**source, "index": prompt.index, "row": prompt.row, "rows": len(rows)}}
            for row in rows]


def skip_row(prompt: Prompt, responses: list[str], outcome: Outcome, source: dict) -> dict:
    """What OUT.skipped.jsonl records: the prompt, why, and what was shown (with a judge's scores)."""
    scores = {"scores": outcome.scores} if outcome.scores is not None else {}
    return {"prompt": prompt.text, "skipped": outcome.skip, "responses": responses, **scores,
            "source": {**source, "index": prompt.index, "row": prompt.row, "rows": 1}}


def append_rows(path: Path, rows: list[dict]) -> None:
    """One write, flushed and fsynced: after a crash the file ends with whole rows or a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        fh.flush()
        os.fsync(fh.fileno())


def read_log(path: Path, console: Console) -> list[dict]:
    """The rows already written; a torn last line or an incomplete last prompt is dropped (and said)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]  # the piece after the last newline is empty, or torn
    rows, ends, end = [], [], 0
    for number, line in enumerate(lines, start=1):
        end += len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except ValueError:
            raise DataError(f"{path}: line {number}: not a JSON row; it was edited or damaged. Fix or delete that "
                            "line, then run the same command again") from None
        if not isinstance(row, dict) or not isinstance(row.get("source"), dict) or \
                not isinstance(row["source"].get("index"), int):
            raise DataError(f"{path}: line {number}: no source.index; not written by deltatune feedback. Give a new "
                            "--out file")
        rows.append(row)
        ends.append(end)
    keep = len(rows)
    last = rows[-1]["source"] if rows else None
    if last is not None and "rows" in last:  # a prompt's rows go in one write: all of them or none count
        group = sum(1 for r in rows if r["source"]["index"] == last["index"])
        keep = len(rows) - group if group < last["rows"] else keep
    size = ends[keep - 1] if keep else 0
    torn = data.split(b"\n")[-1]
    if torn.strip() and not _torn_row(torn):  # never cut off what this command did not begin to write
        raise DataError(f"{path}: its last line is not a row deltatune feedback wrote (and has no newline); not a "
                        "preference file of this command, or edited. Give a new --out file, or fix that line")
    if size < len(data):
        console.print(f"note: {path}: the last session stopped while writing (line {keep + 1} on is incomplete); "
                      "dropped it, that prompt will be asked again", markup=False)
        os.truncate(path, size)
    return rows[:keep]


def _torn_row(piece: bytes) -> bool:
    """Whether a last line without a newline is the start of a row this command wrote, cut short by a crash:
    every row starts ``{"prompt": ``, and a whole one (only its newline lost) has a source.index."""
    if not piece.startswith(b'{"prompt": '):
        return False
    try:
        row = json.loads(piece.decode("utf-8"))
    except ValueError:
        return True
    return isinstance(row, dict) and isinstance(row.get("source"), dict) and isinstance(row["source"].get("index"), int)


def check_kind(rows: list[dict], path: Path, thumbs: bool) -> None:
    """A file holds thumbs rows or preference rows (pairs, rankings), never both."""
    for number, row in enumerate(rows, start=1):
        if ("completion" in row) != thumbs:
            found, mode = ("pairs or rankings", "with") if thumbs else ("thumbs rows", "without")
            raise DataError(f"{path}: line {number}: the file holds {found} of an earlier session, and this one runs "
                            f"{mode} --thumbs; a file holds one kind of row. Give a new --out file, or run as that "
                            "session did")


def check_prompts(prompts: list[Prompt], rows: list[dict], path: Path, prompts_path: Path) -> None:
    """Every row written must be the same prompt text at the same index as in today's prompts file."""
    for number, row in enumerate(rows, start=1):
        index = row["source"]["index"]
        if index >= len(prompts):
            raise DataError(f"{prompts_path}: has {len(prompts)} prompts, but {path} line {number} answered prompt "
                            f"{index + 1}; the prompts file changed. Restore it, or give a new --out file")
        if row.get("prompt") != prompts[index].text:
            raise DataError(f"{prompts_path}: row {prompts[index].row}: the prompt is {prompts[index].text[:60]!r} "
                            f"but {path} line {number} answered {str(row.get('prompt'))[:60]!r} there; the prompts "
                            "file changed since that session. Restore it, or give a new --out file")


# ----------------------------------------------------------------------------- the session

@dataclass
class Session:
    out: Path
    source: dict  # model, seed and sampling settings written into every row
    sample: Callable[[Prompt], list[str]]
    decide: Decide
    console: Console
    least: int = 2  # the fewest responses that can be judged (thumbs: 1)


def pending(prompts: list[Prompt], out: Path, prompts_path: Path, console: Console,
            thumbs: bool = False) -> list[Prompt]:
    """The prompts neither answered nor skipped in earlier sessions, after checking those files."""
    answered = read_log(out, console)
    skipped = read_log(skipped_path(out), console)
    check_kind(answered, out, thumbs)
    check_prompts(prompts, answered, out, prompts_path)
    check_prompts(prompts, skipped, skipped_path(out), prompts_path)
    done = {r["source"]["index"] for r in answered + skipped}
    todo = [p for p in prompts if p.index not in done]
    if done:
        where = f"; continuing at prompt {todo[0].index + 1} (row {todo[0].row})" if todo else ""
        console.print(f"resuming {out}: {len(done)} of {len(prompts)} prompts done{where}", markup=False)
    return todo


def too_few(responses: list[str], least: int) -> Outcome | None:
    """The skip a prompt gets without asking anyone: fewer different responses than can be judged."""
    if len(responses) < least:
        return Outcome(skip=f"the model gave {len(responses)} different non-empty response(s)")
    return None


def record(out: Path, prompt: Prompt, responses: list[str], outcome: Outcome, source: dict) -> None:
    """Write what was decided about one prompt: its rows to ``out``, or a skip to OUT.skipped.jsonl (the studio's
    Feedback page writes through this too, so both write the same files)."""
    if outcome.skip:
        append_rows(skipped_path(out), [skip_row(prompt, responses, outcome, source)])
    else:
        append_rows(out, output_rows(prompt, responses, outcome, source))


def sampling_source(model: str, seed: int, temperature: float, top_p: float, max_new_tokens: int) -> dict:
    """The ``source`` fields every row of a session carries (see the module docstring)."""
    return {"model": model, "seed": seed, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}


def run_session(session: Session, todo: list[Prompt]) -> dict:
    """Ask about each prompt in turn, writing as it goes; stops early when the person quits."""
    counts = {"answered": 0, "skipped": 0}
    for prompt in todo:
        responses = session.sample(prompt)
        outcome = too_few(responses, session.least) or session.decide(prompt, responses)
        if outcome is None:
            break
        record(session.out, prompt, responses, outcome, session.source)
        counts["skipped" if outcome.skip else "answered"] += 1
    done = counts["answered"] + counts["skipped"]
    remaining = len(todo) - done
    tail = f"; {remaining} left: run the same command to continue" if remaining else "; all prompts done"
    session.console.print(f"answered {counts['answered']}, skipped {counts['skipped']} this session{tail}",
                          markup=False)
    return {**counts, "remaining": remaining, "out": str(session.out), "skipped_file": str(skipped_path(session.out))}


def feedback(prompts_path: str | Path, model: str, out: str | Path, k: int | None = None, *,
             prompt_column: str = "prompt", max_new_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
             seed: int = 0, judge: str | None = None, judge_label: str | None = None, thumbs: bool = False,
             ask: Callable[[str], str] | None = None, console: Console | None = None) -> dict:
    """Sample k responses per prompt from ``model`` (None: 2); a person (``ask``, else the terminal) or ``judge``
    ranks them; with ``thumbs`` one response per prompt, that a person calls good or bad. Rows go to ``out``
    as they are decided. Returns counts of this session."""
    console = console or Console()
    out, prompts_path = Path(out), Path(prompts_path)
    _check_options(out, k, temperature, top_p, max_new_tokens, judge, judge_label, ask, thumbs)
    k = 1 if thumbs else k or 2
    prompts = read_prompts(prompts_path, prompt_column)
    todo = pending(prompts, out, prompts_path, console, thumbs)
    if not todo:
        console.print(f"all {len(prompts)} prompts are done in {out}", markup=False)
        return {"answered": 0, "skipped": 0, "remaining": 0, "out": str(out), "skipped_file": str(skipped_path(out))}
    sampler = load_sampler(model)
    source = sampling_source(sampler.name, seed, temperature, top_p, max_new_tokens)
    if judge:
        chosen_judge = load_judge(judge, judge_label)
        decide = judge_decider(chosen_judge, console)
        source["judge"] = chosen_judge.name
    else:
        decide = person_decider(ask or console.input, console, len(prompts), thumbs)
    session = Session(out, source, lambda p: sample_responses(
        sampler, p.text, k, max_new_tokens, temperature, top_p, seed), decide, console, least=min(k, 2))
    return run_session(session, todo)


def _check_options(out: Path, k: int | None, temperature: float, top_p: float, max_new_tokens: int,
                   judge: str | None, judge_label: str | None, ask, thumbs: bool = False) -> None:
    if out.suffix.lower() != ".jsonl":
        raise DeltatuneError(f"--out {out}: preference files are JSONL; name it {out.with_suffix('.jsonl').name}")
    if thumbs and (judge or (k is not None and k != 1)):
        raise DeltatuneError(f"--thumbs: a person judges one response per prompt, up or down; drop "
                             f"{'--judge (a judge ranks responses)' if judge else f'--k {k}'}")
    if not thumbs and k is not None and k < 2:
        raise DeltatuneError(f"--k {k}: a preference compares at least 2 responses (one response, up or down: "
                             "--thumbs)")
    if temperature <= 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
        raise DeltatuneError("--temperature must be > 0 (greedy decoding repeats one response), --top-p in (0, 1], "
                             "--max-new-tokens at least 1")
    if judge_label and not judge:
        raise DeltatuneError("--judge-label needs --judge RUN_DIR (the classifier whose label it names)")
    if not judge and ask is None and not sys.stdin.isatty():
        if thumbs:
            raise DeltatuneError("feedback --thumbs: stdin is not a terminal, so nobody can judge the responses; "
                                 "run it in a terminal")
        raise DeltatuneError("feedback: stdin is not a terminal, so nobody can rank the responses; run it in a "
                             "terminal, or pass --judge RUN_DIR to let a model rank them")
