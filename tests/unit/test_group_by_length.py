"""train.group_by_length: every example once per epoch, homogeneous batches, seeded order, exact resume."""

import json
import random

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from deltatune.config import TrainConfig
from deltatune.eval.evaluate import task_for
from deltatune.train.loop import GROUP_WINDOW, Job, _epoch_loader, length_grouped_batches
from deltatune.train.run import resume, train
from tests.helpers import config


def _job(n: int, batch_size: int, group: bool, seed: int = 3) -> Job:
    rng = random.Random(0)
    examples = [{"input_ids": [5] * rng.randint(1, 60), "label": i} for i in range(n)]  # the label is the index
    return Job(model=nn.Identity(), method=None, options=None, task=task_for("classification"), train_examples=examples,
               eval_examples=[], run=None, train=TrainConfig(batch_size=batch_size, seed=seed, group_by_length=group))


def _batches(job: Job, epoch: int, skip: int = 0) -> list[list[int]]:
    accelerator = Accelerator(cpu=True)
    loader = _epoch_loader(job, epoch, accelerator)
    if skip:
        loader = accelerator.skip_first_batches(loader, skip)
    return [b["targets"].tolist() for b in loader]


def _lengths(job: Job, batch: list[int]) -> list[int]:
    return [len(job.train_examples[i]["input_ids"]) for i in batch]


def test_every_example_once_per_epoch():
    job = _job(203, 8, group=True)  # 203 = 25 * 8 + 3: a short last batch
    for epoch in range(2):
        seen = [i for b in _batches(job, epoch) for i in b]
        assert sorted(seen) == list(range(203))


def test_batches_are_homogeneous_and_pad_far_less():
    grouped, plain = _job(200, 8, group=True), _job(200, 8, group=False)
    batches = _batches(grouped, 0)
    # 25 batches fit in one window: they are consecutive runs of the length-sorted examples,
    # so no two batches' length ranges overlap except at their edges.
    spans = sorted((min(_lengths(grouped, b)), max(_lengths(grouped, b))) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))

    def padding(job, batches):
        return sum(max(_lengths(job, b)) * len(b) - sum(_lengths(job, b)) for b in batches)

    assert padding(grouped, batches) * 10 < padding(plain, _batches(plain, 0))


def test_batch_order_is_shuffled_seeded_and_new_each_epoch():
    job = _job(200, 8, group=True)
    first = _batches(job, 0)
    assert first == _batches(job, 0)  # same (seed, epoch): same batches in the same order
    assert first != _batches(job, 1)
    assert first != _batches(_job(200, 8, group=True, seed=4), 0)
    widths = [max(_lengths(job, b)) for b in first]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # not longest-first


def test_windows_keep_batches_within_one_window():
    lengths = list(range(1000))
    batches = length_grouped_batches(lengths, 4, torch.Generator().manual_seed(0))
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    window_of = {i: pos // (4 * GROUP_WINDOW) for pos, i in enumerate(order)}
    assert all(len({window_of[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == lengths


def test_skipping_batches_resumes_the_same_order():
    job = _job(203, 8, group=True)
    assert _batches(job, 1, skip=5) == _batches(job, 1)[5:]


COMMON = ["train.epochs=2", "train.grad_accum=2", "train.save_every=2", "train.lr=2e-3",
          "train.group_by_length=true"]


def test_interrupted_grouped_run_resumes_exactly(tiny_bert, cls_csv, tmp_path):
    straight = train(config(tiny_bert, "classification", "full", cls_csv, tmp_path / "a", *COMMON))

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "full", cls_csv, tmp_path / "b", *COMMON), callbacks=(interrupt,))
    resumed = resume(tmp_path / "b")

    def losses(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, (path / "log.jsonl").read_text().splitlines())
                if "loss" in r]

    assert losses(straight.path) == losses(resumed.path)
    assert len(losses(straight.path)) >= 4
