"""The task protocol: everything that differs between tasks lives behind it.

A task knows how its base model and head are built, how rows become typed examples, how examples
are batched, its loss (bound to the task's own settings), how it is evaluated and which metric
judges a run (with its direction), and how a tuned model predicts. Nothing outside ``tasks/``
asks "which task is this?": it asks the task.

Class attributes say what a task *is* (read them from the class: ``registry.get(name).main_metric``);
an instance, made by ``Task(cfg, labels)``, binds the run's settings.
"""

from __future__ import annotations

from dataclasses import dataclass


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


class Task:
    name: str = ""
    summary: str = ""
    main_metric: Metric = Metric("loss", maximize=False)
    head: str = "causal"          # the base model's head: sequence | token | causal | seq2seq
    peft_type: str = "CAUSAL_LM"  # peft's TaskType member for this head
    new_head: bool = False        # a freshly initialised head that trains along with any method's delta
    one_label_per_text: bool = False  # each example is one text with one class label (feature extraction)
    loop: str = "examples"        # "examples": the one loop over fixed examples; "rollouts": sampled data (PPO)

    @classmethod
    def accepts(cls, method) -> str | None:
        """Why ``method`` cannot train this task, or None. Methods say the same of tasks (``Method.accepts``)."""
        return None
