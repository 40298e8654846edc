"""The task protocol: everything that differs between tasks lives behind it.

A task knows how its base model and head are built, which columns its rows need and how they
become typed examples, how examples are batched, its loss (bound to the task's own settings),
how it is evaluated, which metric judges a run (with its direction) and how a tuned model
predicts. Nothing outside ``tasks/`` asks "which task is this?": it asks the task.

Class attributes say what a task *is* (read them from the class: ``registry.get(name).main_metric``);
an instance, ``Task(cfg, pad_id)``, binds the run's settings, and ``prepare`` sets its ``labels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config
from ..data.examples import PreparedData, Split, check_known_labels
from ..data.prepare import Fields, Ledger, PreparedRows, RowStage, prepare_rows
from ..errors import DataError, RunError
from ..models import load_model
from .common import batches

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Metric:
    """The metric that judges a run, and its direction: the one definition the loop (best delta),
    the run registry, ``tune`` and ``compare`` all read."""
    name: str
    maximize: bool

    def score(self, metrics: dict) -> float:
        """Higher is better, whatever the direction."""
        value = float(metrics[self.name])
        return value if self.maximize else -value

    @property
    def direction(self) -> str:
        return "maximize" if self.maximize else "minimize"

    def as_dict(self) -> dict:
        return {"name": self.name, "maximize": self.maximize}


class Task:
    name: str = ""
    summary: str = ""
    main_metric: Metric = Metric("loss", maximize=False)
    head: str = "causal"          # the base model's head (models.HEADS): sequence | token | causal | seq2seq
    peft_type: str = "CAUSAL_LM"  # peft's TaskType member for this head
    new_head: bool = False        # a freshly initialised head that trains along with any method's delta
    one_label_per_text: bool = False  # each example is one text with one class label (feature extraction)
    loop: str = "examples"        # "examples": the one loop over fixed examples; "rollouts": sampled data (PPO)
    multitask: bool = False       # can train several labelled data sets at once (data.tasks)
    packs: bool = False           # short examples may share rows (data.pack)
    measures_forgetting: bool = False  # general-text perplexity before and after (eval.forgetting)
    icl_baselines: bool = False   # zero/k-shot prompting baselines of a decoder base (eval.icl_shots)
    needs_reference: bool = False  # examples carry the base model's scores (``with_reference``)
    generates: bool = False       # a tuned model writes responses to prompts (predict, feedback, PPO's policy)
    scores_responses: bool = False  # a tuned model scores (prompt, response) pairs (``score``: reward models)
    reference_is_delta_off: bool = False  # its reference model is the policy with the delta switched off (PPO)
    one_learning_rate: bool = False  # its own loop's optimizer trains every parameter at one rate (PPO)
    # ``predict`` reads only the ``.logits`` of one forward pass over padded texts (input_ids, attention_mask):
    # a graph of that forward (ONNX) under the same ``predict`` answers as the run.
    predicts_from_logits: bool = False
    # ``evaluate`` takes ``outcomes`` and fills it with the main metric per example (compare's intervals and
    # paired tests); a task without it keeps the two-argument ``evaluate``.
    keeps_outcomes: bool = False
    answers_held_out: bool = False  # its held-out rows have an input and a reference answer (``sample_input``)

    def __init__(self, cfg: Config, pad_id: int = 0, labels: list[str] | None = None):
        self.cfg, self.pad_id, self.labels = cfg, pad_id, labels
        self.chunked = cfg.train.chunked_loss
        self.batch_size = cfg.train.eval_batch_size

    # ------------------------------------------------------------------ capabilities and config

    @classmethod
    def accepts(cls, method) -> str | None:
        """Why ``method`` cannot train this task, or None. Methods say the same of tasks (``Method.accepts``)."""
        return None

    @classmethod
    def problems(cls, cfg: Config) -> list[str]:
        """What is wrong with ``cfg`` for this task (config validation; every problem at once)."""
        out = []
        if cfg.eval.icl_shots and not cls.icl_baselines:
            out.append(f"eval.icl_shots: in-context baselines are for classification, not {cfg.task!r}")
        if cfg.data.pack and not cls.packs:
            out.append(f"data.pack: packing is for causal-LM training; task {cfg.task!r} does not use it")
        if cfg.data.tasks and not cls.multitask:
            out.append(f"data.tasks: multi-task training is for task classification, not {cfg.task!r}")
        return out

    # ------------------------------------------------------------------ data

    def fields(self, columns: set) -> Fields:
        """The columns rows need (``columns``: those the file has), and what the pipeline may do with them."""
        raise NotImplementedError

    def rows(self, tokenizer=None) -> PreparedRows:
        """The data pipeline on the configured files (``tokenizer`` adds token-length figures)."""
        return prepare_rows(self.cfg, self.fields, tokenizer)

    def label_set(self, train: list[dict], held_out: list[dict], where: str) -> list[str] | None:
        """The labels the head predicts (index -> name), from the prepared rows; None without a labelled head."""
        return None

    def examples(self, rows: list[dict], tokenizer) -> list:
        """Rows -> typed examples (``data.examples``)."""
        raise NotImplementedError

    def prepare(self, tokenizer) -> PreparedData:
        """Rows through the pipeline, the label set (kept in ``self.labels``), tokenized examples."""
        rows = self.rows(tokenizer)
        train_rows, eval_rows, test_rows = (rows.splits[s] for s in ("train", "eval", "test"))
        where = rows.report["files"].get("train", self.cfg.data.train)
        self.labels = self.label_set(train_rows, eval_rows + test_rows, where)
        train = Split(train_rows, self.examples(train_rows, tokenizer))
        if not train.examples:
            raise DataError(f"{where}: no usable training examples after tokenization")
        return PreparedData(train, Split(eval_rows, self.examples(eval_rows, tokenizer)), self.labels,
                            rows.report["fingerprint"], rows.mode,
                            Split(test_rows, self.examples(test_rows, tokenizer) if test_rows else []),
                            rows.report, rows.rejects)

    def file_examples(self, path: str, tokenizer) -> list:
        """Examples from one more file, cleaned and formatted like the run's training data and checked
        against its columns and labels (no de-duplication or splitting): ``deltatune eval --data``."""
        stage = RowStage(self.cfg, Ledger(), self.fields)
        rows = stage.load(path)
        if not rows:
            raise DataError(f"{path}: no usable rows")
        if self.labels:
            check_known_labels(rows, stage.fields.label, self.labels)
        return self.examples(rows, tokenizer)

    # ------------------------------------------------------------------ model

    def head_labels(self) -> list[str] | None:
        """What the head's outputs are called (a new sequence or token head), or None."""
        return self.labels if self.new_head else None

    def build_model(self, path, **extra) -> nn.Module:
        """The untouched base with this task's head; ``extra`` from the method (``Method.load_kwargs``)."""
        return load_model(path, self.head, self.head_labels(), self.pad_id, **extra)

    # ------------------------------------------------------------------ batches, loss, evaluation

    def length(self, example) -> int:
        """Tokens in an example (what batches are grouped and sorted by)."""
        return len(example["input_ids"])

    def collate(self, examples: list) -> dict:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        """(loss summed over the batch's items, number of items): the loop averages over processes."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, examples: list, outcomes: dict | None = None) -> dict:
        """The loss and this task's metrics (``main_metric`` among them). A task that ``keeps_outcomes`` fills
        ``outcomes`` (when given) with its main metric per example (``metrics.outcome_record``)."""
        raise NotImplementedError

    def batches(self, examples: list):
        return batches(examples, self.batch_size, self.collate, self.length)

    def with_reference(self, reference: nn.Module, examples: list) -> list:
        """The examples with what the base model (``reference``, the delta switched off) says of them,
        for tasks whose loss compares with it (``needs_reference``); computed once, before training."""
        return examples

    # ------------------------------------------------------------------ use

    @property
    def input_column(self) -> str:
        """The column ``predict --input FILE`` reads texts from."""
        return self.cfg.data.prompt_column

    def predict(self, model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int = 64) -> list[dict]:
        """What ``deltatune predict`` prints per text (labels with probabilities, tags, generated text)."""
        raise RunError(f"task {self.name} does not predict from text")

    def sample_input(self, row: dict) -> tuple[str, str]:
        """(the text ``predict`` reads, the reference answer) of a prepared held-out row, as strings: what
        ``deltatune eval --samples`` shows next to the base and tuned models' answers."""
        raise RunError(f"a {self.name} run has no reference answers to show next to its predictions; held-out "
                       "answers are for classification, token_classification, causal_lm (prompt/response) and "
                       "seq2seq runs")

    def answer_text(self, prediction: dict) -> str:
        """One of ``predict``'s answers as a short string (a sample's before and after)."""
        return str(prediction.get("response", ""))

    def score(self, model: nn.Module, tokenizer, prompts: list[str], responses: list[str]) -> list[float]:
        """A score per (prompt, response): reward models."""
        raise RunError(f"a {self.name} run, not a reward model (task reward); score needs a run trained "
                       "with task: reward")
