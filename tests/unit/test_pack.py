"""Packing: rows hold whole examples, and a packed row gives every example the loss it gets alone."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import find_packed_sequence_indices

from deltatune.data.collate import collate
from deltatune.data.examples import IGNORE, encode_sft
from deltatune.data.pack import pack
from deltatune.errors import DataError
from deltatune.eval.evaluate import forward
from deltatune.losses import causal_lm_loss
from deltatune.models import load_model, load_tokenizer
from tests.conftest import qa_rows, write_jsonl
from tests.helpers import config


def synthetic(n: int, longest: int = 12, seed: int = 0) -> list[dict]:
    """Examples of random length with a random-length masked prompt."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, 40) for _ in range(rng.randint(1, longest))]
        prompt = rng.randrange(len(ids))
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def segments(row: dict):
    """(example index, start, length) of each example in a packed row."""
    start = 0
    for i, n in zip(row["indices"], row["lengths"]):
        yield i, start, n
        start += n


def test_rows_hold_whole_examples_in_order_with_restarting_positions():
    examples = synthetic(40)
    rows = pack(examples, 16)
    assert sorted(i for row in rows for i in row["indices"]) == list(range(40))  # each example exactly once
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["lengths"]) <= 16
        assert row["indices"] == sorted(row["indices"])
        for i, start, n in segments(row):
            e = examples[i]
            assert row["input_ids"][start:start + n] == e["input_ids"]
            assert row["position_ids"][start:start + n] == list(range(n))
            # the first token is never predicted from the previous example's last token
            assert row["labels"][start:start + n] == [IGNORE] + e["labels"][1:]


def test_packing_is_deterministic_tight_and_leaves_its_input_alone():
    examples = synthetic(40)
    before = copy.deepcopy(examples)
    assert pack(examples, 16) == pack(before, 16)
    assert examples == before
    # In order, 9 | 8 7 | 8 | 9 7 takes four rows; longest-first best fit needs three.
    sized = [{"input_ids": [5] * n, "labels": [5] * n} for n in (9, 8, 7, 8, 9, 7)]
    assert [row["lengths"] for row in pack(sized, 16)] == [[9, 7], [8, 8], [9, 7]]
    assert pack([], 16) == []


def test_packing_refuses_examples_it_cannot_pack():
    with pytest.raises(DataError, match="example 1 has 17 tokens.*max_length=16"):
        pack([{"input_ids": [1], "labels": [1]}, {"input_ids": [1] * 17, "labels": [1] * 17}], 16)
    with pytest.raises(DataError, match="example 0 has 2 labels for 3 tokens"):
        pack([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 16)


def test_collated_rows_give_each_example_and_the_padding_its_own_segment():
    rows = pack(synthetic(12), 16)
    batch = collate(rows, pad_id=0)
    assert set(batch["inputs"]) == {"input_ids", "position_ids"}  # a 2-D mask turns packing off
    assert batch["tokens"] == sum(sum(row["lengths"]) for row in rows)
    # transformers' own segmentation: one id per example, then one for the row's padding
    found = find_packed_sequence_indices(batch["inputs"]["position_ids"])
    width = batch["inputs"]["input_ids"].shape[1]
    for r, row in enumerate(rows):
        expected = [k for k, n in enumerate(row["lengths"]) for _ in range(n)]
        expected += [len(row["lengths"])] * (width - len(expected))
        assert found[r].tolist() == expected
        assert batch["targets"][r, sum(row["lengths"]):].eq(IGNORE).all()


def test_unpacked_batches_are_unchanged():
    batch = collate([{"input_ids": [3, 4, 5], "labels": [IGNORE, 4, 5]}, {"input_ids": [6], "labels": [6]}], 0)
    assert set(batch["inputs"]) == {"input_ids", "attention_mask"}
    assert batch["inputs"]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["targets"].tolist() == [[IGNORE, 4, 5], [6, IGNORE, IGNORE]]
    assert batch["tokens"] == 4


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each label's loss given the tokens before it (0 where ignored), aligned with ``labels``."""
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                             ignore_index=IGNORE, reduction="none")
    return F.pad(losses.view(labels.shape[0], -1), (1, 0))


def run(model, rows: list[dict], batch_size: int) -> tuple[float, int, list[torch.Tensor]]:
    """Summed loss, target count and per-row token losses, through the training code's own path."""
    total, count, per_row = 0.0, 0, []
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start:start + batch_size], pad_id=0)
        logits = forward(model, batch["inputs"], batch["targets"], "causal_lm")
        loss, n = causal_lm_loss(logits, batch["targets"])
        total, count = total + float(loss), count + n
        per_row += list(token_losses(logits, batch["targets"]))
    return total, count, per_row


@pytest.fixture(scope="module")
def sft_examples(tiny_llama, tmp_path_factory) -> list[dict]:
    tok = load_tokenizer(tiny_llama)
    cfg = config(tiny_llama, "causal_lm", "lora", write_jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", qa_rows(4)))
    return encode_sft(qa_rows(13, seed=1), tok, cfg) + synthetic(10, longest=20)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@torch.no_grad()
def test_packed_rows_give_the_same_per_example_loss_as_unpacked(tiny_llama, sft_examples, attention):
    model = load_model(tiny_llama, "causal", attn_implementation=attention).eval()
    assert model.config._attn_implementation == attention
    rows = pack(sft_examples, 64)
    assert len(rows) < len(sft_examples) and len({len(r["input_ids"]) for r in rows}) > 1  # padding is exercised

    total, count, alone = run(model, sft_examples, batch_size=1)  # each alone
    packed_total, packed_count, packed = run(model, rows, batch_size=3)
    assert packed_count == count
    # The float32 sums add the same token losses in another order: equal to ~1e-7 relative.
    assert packed_total == pytest.approx(total, rel=1e-6)
    assert packed_total / count == pytest.approx(total / count, abs=1e-5)
    for row, losses in zip(rows, packed):
        for i, start, n in segments(row):
            torch.testing.assert_close(losses[start:start + n], alone[i][:n], atol=1e-5, rtol=0)

    # Negative control: the same rows as plain sequences (no position resets, a full attention
    # mask) let examples see each other, and the loss moves.
    plain = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    leaked_total, leaked_count, _ = run(model, plain, batch_size=3)
    assert leaked_count == count
    assert abs(leaked_total - total) > 1e-3
