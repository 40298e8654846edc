"""The Feedback page's work: a labeling session in the browser, the same loop as ``deltatune feedback``.

A ``Labeling`` holds the prompts its output file has not answered yet (``feedback.pending``: the same checks
and the same resume), samples their responses in a background thread a few prompts ahead of the one on
screen (``feedback.sample_responses``, seeded by the prompt: the same candidates the command shows), and
writes each answer at once through ``feedback.record``: the same rows, the same skipped file. The page only
reads its state; the event loop never waits for torch."""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException
from rich.console import Console

from ..errors import DeltatuneError
from ..rlhf.feedback import (Prompt, Sampler, load_sampler, parse_answer, parse_thumb, pending, read_log, read_prompts,
                             record, sample_responses, sampling_source, skipped_path, too_few)
from .textmodels import TextModel

log = logging.getLogger("deltatune.studio")
AHEAD = 2             # prompts sampled ahead of the one on screen
MAX_SESSIONS = 4      # sessions kept at once; the oldest finished (else idle) one goes first
MAX_SAMPLERS = 2      # models kept loaded
MODES = {"pick": "pick the best response", "rank": "rank all responses", "thumbs": "thumbs up or down (KTO)"}


@dataclass(frozen=True)
class Setup:
    """What a session samples and where it writes (paths already confined to the data root)."""
    prompts: Path
    prompts_name: str     # as the page shows it (relative to the data root)
    column: str
    model: TextModel
    out: Path
    out_name: str
    mode: str             # a key of MODES
    k: int                # responses per prompt (1 for thumbs)
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0

    @property
    def thumbs(self) -> bool:
        return self.mode == "thumbs"


@dataclass(eq=False)
class Labeling:
    setup: Setup
    todo: list[Prompt]
    total: int
    answered: int         # prompts answered, in this session and before it
    skipped: int
    note: str = ""        # what resuming said (a torn last line dropped, where it goes on)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    position: int = 0     # the prompt on screen: todo[position]
    source: dict | None = None  # set once the model has loaded
    responses: dict[int, list[str]] = field(default_factory=dict)
    sampling: int | None = None  # the prompt index being sampled now
    error: str | None = None
    version: int = 0      # bumped at every change (the page's live updates watch it)
    touched: float = field(default_factory=time.monotonic)
    closed: bool = False
    cv: threading.Condition = field(default_factory=threading.Condition)

    @property
    def state(self) -> str:
        """failed, done, ready (the prompt on screen has its responses), loading (the model) or sampling."""
        if self.error:
            return "failed"
        if self.position >= len(self.todo):
            return "done"
        if self.todo[self.position].index in self.responses:
            return "ready"
        return "loading" if self.source is None else "sampling"

    @property
    def current(self) -> Prompt | None:
        return self.todo[self.position] if self.position < len(self.todo) else None

    def answer(self, index: int, text: str) -> None:
        """A person's answer about the prompt on screen (``index``), in ``deltatune feedback``'s words: a number,
        a ranking best first, t (tie), s (skip); u or d with thumbs. Written at once."""
        with self.cv:
            prompt = self.current
            if self.state != "ready" or prompt is None or index != prompt.index:
                raise HTTPException(409, "that prompt was answered already (in another tab?), or its responses are "
                                         "not ready; the page now shows where the session stands")
            responses = self.responses[prompt.index]
            try:
                outcome = parse_thumb(text) if self.setup.thumbs else parse_answer(text, len(responses))
            except ValueError as exc:
                raise HTTPException(400, str(exc).replace("; q: quit", "")) from None
            if outcome is None:
                raise HTTPException(400, "to stop, leave the page: answers are saved as they are given, and starting "
                                         "the same session again goes on from here")
            record(self.setup.out, prompt, responses, outcome, self.source)
            self._advance(skipped=bool(outcome.skip))

    def _advance(self, skipped: bool) -> None:
        """Past the prompt on screen. Called with ``cv`` held."""
        self.skipped, self.answered = self.skipped + skipped, self.answered + (not skipped)
        self.responses.pop(self.todo[self.position].index, None)
        self.position += 1
        self._settle()

    def _settle(self) -> None:
        """Skip the prompts on screen the model gave too few responses for, as the command skips them (with
        ``cv`` held), and tell the watchers."""
        least = 1 if self.setup.thumbs else 2
        while self.current is not None and self.current.index in self.responses:
            prompt = self.current
            outcome = too_few(self.responses[prompt.index], least)
            if outcome is None:
                break
            record(self.setup.out, prompt, self.responses.pop(prompt.index), outcome, self.source)
            self.skipped += 1
            self.position += 1
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self.touched = time.monotonic()
        self.cv.notify_all()

    def _next(self) -> Prompt | None:
        """The first prompt from the one on screen to AHEAD past it that has no responses yet."""
        return next((p for p in self.todo[self.position:self.position + AHEAD + 1] if p.index not in self.responses),
                    None)

    def work(self, sampler_for) -> None:
        """The background thread: load the model, then keep AHEAD prompts sampled."""
        s = self.setup
        try:
            sampler = sampler_for(s.model.ref)
            with self.cv:
                self.source = sampling_source(sampler.name, s.seed, s.temperature, s.top_p, s.max_new_tokens)
                self._changed()
            while True:
                with self.cv:
                    while (prompt := self._next()) is None and not self.closed:
                        self.cv.wait()
                    if self.closed:
                        return
                    self.sampling = prompt.index
                responses = sample_responses(sampler, prompt.text, s.k, s.max_new_tokens, s.temperature, s.top_p,
                                             s.seed)  # one sampler at a time (feedback.SEEDED_SAMPLING)
                with self.cv:
                    self.sampling = None
                    self.responses[prompt.index] = responses
                    self._settle()
        except DeltatuneError as exc:
            self._fail(str(exc))
        except Exception:  # a bug: the terminal gets the trace, the page a plain line
            log.exception("studio feedback: session %s failed", self.id)
            self._fail("sampling failed; the studio's terminal shows why")

    def _fail(self, message: str) -> None:
        with self.cv:
            self.error = message
            self._changed()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


def open_labeling(setup: Setup) -> Labeling:
    """A session over what ``setup.out`` has not answered yet (DataError when the files do not fit together)."""
    notes = Console(file=io.StringIO(), width=400)
    prompts = read_prompts(setup.prompts, setup.column)
    todo = pending(prompts, setup.out, setup.prompts, notes, setup.thumbs)
    answered = {r["source"]["index"] for r in read_log(setup.out, notes)}
    skipped = {r["source"]["index"] for r in read_log(skipped_path(setup.out), notes)}
    return Labeling(setup, todo, len(prompts), len(answered), len(skipped), notes.file.getvalue().strip())


class Labelings:
    """The studio's labeling sessions (at most MAX_SESSIONS), one per output file, and the models they sample
    from (at most MAX_SAMPLERS loaded)."""

    def __init__(self):
        self._sessions: dict[str, Labeling] = {}
        self._samplers: OrderedDict[str, Sampler] = OrderedDict()
        self._lock = threading.Lock()
        self._loading = threading.Lock()  # one model load at a time
        self._threads: list[threading.Thread] = []

    def start(self, setup: Setup) -> Labeling:
        """The session writing ``setup.out``: the running one if it has the same setup, else a new one."""
        with self._lock:
            for session in self._sessions.values():
                if session.setup.out == setup.out and session.state not in ("done", "failed"):
                    if session.setup == setup:
                        return session
                    raise HTTPException(409, f"{setup.out_name} is being written by another session with other "
                                             "settings; go on with that one (listed on the Feedback page) or choose "
                                             "another output file")
            session = open_labeling(setup)
            self._make_room()
            self._sessions[session.id] = session
        if session.todo:
            self._threads.append(threading.Thread(target=session.work, args=(self._sampler,), daemon=True,
                                                  name=f"feedback-{session.id}"))
            self._threads[-1].start()
        return session

    def close(self, seconds: float = 60.0) -> None:
        """Every session told to stop, and its sampling thread waited for (the studio is shutting down: a
        thread still inside torch when the interpreter exits aborts the process)."""
        with self._lock:
            for session in self._sessions.values():
                session.close()
        for thread in self._threads:
            thread.join(seconds)

    def get(self, session_id: str) -> Labeling:
        session = self._sessions.get(session_id)
        if session is None:
            raise HTTPException(404, "no such labeling session (the studio was restarted, or it ended); start it "
                                     "again from the Feedback page: it goes on where its output file stops")
        return session

    def all(self) -> list[Labeling]:
        return sorted(self._sessions.values(), key=lambda s: -s.touched)

    def _make_room(self) -> None:
        while len(self._sessions) >= MAX_SESSIONS:
            finished = [s for s in self._sessions.values() if s.state in ("done", "failed")]
            oldest = min(finished or self._sessions.values(), key=lambda s: s.touched)
            oldest.close()
            del self._sessions[oldest.id]

    def _sampler(self, ref: str) -> Sampler:
        with self._loading:
            if ref in self._samplers:
                self._samplers.move_to_end(ref)
                return self._samplers[ref]
            sampler = load_sampler(ref)
            self._samplers[ref] = sampler
            while len(self._samplers) > MAX_SAMPLERS:
                self._samplers.popitem(last=False)
            return sampler
