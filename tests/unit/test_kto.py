"""KTO in the one training loop, on the tiny Llama and a learnable thumbs set (a desirable completion
ends in a positive word, an undesirable one in a negative word): it reads thumbs rows and dpo's
preference rows, trains through `deltatune train`, scores the reference once, computes the loss its
pure function defines, and resumes bit-exactly."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune import tasks
from deltatune.cli import main
from deltatune.configure import load_config
from deltatune.data.examples import sft_example
from deltatune.data.preferences import load_thumbs
from deltatune.errors import ConfigError, DataError
from deltatune.inference import evaluate_file, load_run
from deltatune.models import load_tokenizer
from deltatune.rlhf.losses import kto_loss
from deltatune.rundir import RunDir
from deltatune.tasks.kto import mismatched_partners
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job, train
from tests.conftest import FILLER, NEGATIVE, POSITIVE, write_csv, write_jsonl
from tests.helpers import QUICK, config
from tests.unit.test_reward_dpo import hand_logp, preference_rows

# beta 1 and a large rate: KTO's gradient is beta/4 per row at the start (half of DPO's per pair), and the
# toy completions' random filler words move with the label words
LEARN = ["train.epochs=6", "train.lr=1e-1", "train.warmup_ratio=0", "kto.beta=1.0"]
ROOT = Path(__file__).parents[2]


def thumbs_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows over 20 prompts, each prompt with as many thumbs up as down: filler words, then a positive
    word (up) or a negative word (down)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        up = (i // 20) % 2 == 0
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if up else NEGATIVE)]
        rows.append({"prompt": f"what is {i % 20}", "completion": " ".join(words), "label": up})
    return rows


@pytest.fixture
def thumbs_jsonl(tmp_path):
    return write_jsonl(tmp_path / "thumbs.jsonl", thumbs_rows(80))


def _losses(run_path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run_path / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def _train_cli(model, data, out, *extra) -> dict:
    argv = ["train", "--quiet", f"model={model}", "task=kto", "method.name=lora", f"data.train={data}", *QUICK,
            *extra, f"output_dir={out}"]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


# ----------------------------------------------------------------------------- end to end

def test_kto_learns_held_out_rows_end_to_end(tiny_llama, thumbs_jsonl, tmp_path, capsys):
    metrics = _train_cli(tiny_llama, thumbs_jsonl, tmp_path / "run", *LEARN)
    before, after = metrics["baseline"], metrics["eval"]
    assert metrics["main_metric"] == {"name": "loss", "maximize": False}
    # 4 of 20 prompts held out, 4 rows each: 2 up, 2 down
    assert before["rows"] == after["rows"] == 16 and after["desirable_rows"] == after["undesirable_rows"] == 8
    # Before training the policy is the reference: every reward and z0 are 0, each row's loss 1 - sigmoid(0).
    assert before["loss"] == pytest.approx(0.5, abs=1e-6) and before["kl"] == 0.0 and before["accuracy"] == 0.0
    assert before["desirable_reward"] == before["undesirable_reward"] == before["margin"] == 0.0
    # After: the desirable completions' rewards rise above the undesirable ones', on prompts never trained on.
    assert after["desirable_reward"] > 0.2 and after["undesirable_reward"] < -0.2 and after["margin"] > 0.5
    assert after["desirable_logp_change"] > 0 > after["undesirable_logp_change"]
    assert after["accuracy"] >= 0.8 and after["loss"] < before["loss"] - 0.1
    assert after["kl"] >= 0.0
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert len(losses) == metrics["steps"] == 48
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.08  # the training loss falls (last epoch vs first)

    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["mode"] == "thumbs" and report["rows_per_split"] == {"train": 64, "eval": 16}
    assert report["label_counts"]["eval"] == {"desirable": 8, "undesirable": 8}
    assert (tmp_path / "run" / "data_report.html").is_file()

    # The run reloads (the reference is its base, the adapter switched off) and gives back its figures.
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out) == metrics
    held = write_jsonl(tmp_path / "held.jsonl", thumbs_rows(40, seed=7))
    again = evaluate_file(load_run(tmp_path / "run"), str(held))
    assert again["rows"] == 40 and again["margin"] > 0.3 and again["accuracy"] >= 0.7
    # dpo's pair files work too: each pair is one desirable and one undesirable row
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(12, seed=3))
    on_pairs = evaluate_file(load_run(tmp_path / "run"), str(pairs))
    assert on_pairs["desirable_rows"] == on_pairs["undesirable_rows"] == 12 and on_pairs["margin"] > 0.3
    assert main(["predict", str(tmp_path / "run"), "--text", "what is 3", "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["new_tokens"] <= 4


def test_kto_trains_on_preference_pairs(tiny_llama, tmp_path):
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    metrics = _train_cli(tiny_llama, prefs, tmp_path / "run", "train.max_steps=2")
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows_out"] == 80 and report["exact_duplicates_removed"] == 0  # each pair: two rows
    assert report["label_counts"]["train"]["desirable"] == report["label_counts"]["train"]["undesirable"]
    assert metrics["eval"]["desirable_rows"] == metrics["eval"]["undesirable_rows"] == 8


def test_reference_runs_once_and_is_the_base_model(tiny_llama, thumbs_jsonl, tmp_path, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    original = modeling_llama.LlamaModel.forward

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counted)
    # plain loss: no chunked-loss self-check forward
    cfg = config(tiny_llama, "kto", "lora", thumbs_jsonl, None, "train.max_steps=6", "train.eval_every=3",
                 "train.lr=5e-2", "train.chunked_loss=false")
    job, _, _ = build_job(cfg, None)
    batches = math.ceil(len(job.train_examples) / 16) + math.ceil(len(job.eval_examples) / 16)
    assert calls == [False] * 2 * batches  # the reference: completions and mismatched pairs, once per example
    calls.clear()
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    run_loop(job)
    # A step: the mismatched pairs without gradient, then the completions with it; an evaluation scores both.
    eval_batches = math.ceil(len(job.eval_examples) / 16)
    assert calls.count(True) == 6 and calls.count(False) == 6 + 2 * 2 * eval_batches

    model = job.model.eval()
    with torch.no_grad():
        for example in job.train_examples[:4]:
            with model.disable_adapter():
                base = [hand_logp(model, example[side]).item() for side in ("completion", "mismatched")]
            policy = hand_logp(model, example["completion"]).item()
            assert example["reference"] == pytest.approx(base, abs=1e-4)
            assert abs(policy - base[0]) > 1e-3  # the adapter did change the policy


@pytest.mark.parametrize("chunked", [True, False])
def test_batch_loss_equals_kto_loss_of_hand_logps(tiny_llama, thumbs_jsonl, chunked):
    cfg = config(tiny_llama, "kto", "lora", thumbs_jsonl, None, "kto.beta=0.5", "kto.desirable_weight=1.2",
                 "kto.undesirable_weight=0.8")
    job, _, _ = build_job(cfg, None)
    model = job.model.eval()
    # move the policy away from the reference; a seed whose policy puts the mismatched pairs above the reference
    # on average (z0 > 0: with about half the seeds the estimate is negative, and clamped to 0)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    examples = job.train_examples[:3] + job.train_examples[-3:]  # the file lists its thumbs up first
    assert {e["desirable"] for e in examples} == {True, False}
    job.task.chunked = chunked
    total, count = job.task.loss(model, job.task.collate(examples))
    with torch.no_grad():
        logps = torch.stack([hand_logp(model, e["completion"]) for e in examples])
        kl_logps = torch.stack([hand_logp(model, e["mismatched"]) for e in examples])
    ref = torch.tensor([e["reference"] for e in examples])
    desirable = torch.tensor([e["desirable"] for e in examples])
    expected, _, z0 = kto_loss(logps, ref[:, 0], desirable, kl_logps, ref[:, 1], 0.5, 1.2, 0.8)
    assert count == 6 and z0.item() > 0  # the policy moved on the mismatched pairs too
    torch.testing.assert_close(total.detach() / count, expected, rtol=1e-5, atol=1e-6)
    without_z0 = kto_loss(logps, ref[:, 0], desirable, ref[:, 1], ref[:, 1], 0.5, 1.2, 0.8)[0]
    assert abs(expected.item() - without_z0.item()) > 1e-4  # the reference point did count


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_llama, thumbs_jsonl, tmp_path):
    common = ["train.epochs=2", "train.grad_accum=2", "train.save_every=2", "train.lr=5e-2", "kto.beta=0.5"]
    straight = train(config(tiny_llama, "kto", "lora", thumbs_jsonl, tmp_path / "a", *common))

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_llama, "kto", "lora", thumbs_jsonl, tmp_path / "b", *common), callbacks=(interrupt,))
    assert json.loads((tmp_path / "b" / "status.json").read_text())["status"] == "interrupted"
    assert main(["train", "--quiet", "--resume", str(tmp_path / "b")]) == 0
    resumed = RunDir(tmp_path / "b")
    a, b = (load_file(run.delta / "adapter_model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _losses(straight.path) == _losses(resumed.path)
    metrics_a, metrics_b = (json.loads((run.path / "metrics.json").read_text()) for run in (straight, resumed))
    assert metrics_a["eval"] == metrics_b["eval"] and metrics_a["baseline"] == metrics_b["baseline"]
    assert metrics_a["steps"] == metrics_b["steps"] == 8


# ----------------------------------------------------------------------------- data

LABELS = [(True, True), (False, False), ("up", True), ("DOWN", False), (" Up ", True), ("true", True),
          ("False", False), (1, True), (0, False), ("1", True), ("0", False), (1.0, True), (0.0, False)]


def test_thumbs_labels_that_are_accepted(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": label} for i, (label, _) in enumerate(LABELS)]
    thumbs = load_thumbs(write_jsonl(tmp_path / "t.jsonl", rows))
    assert [t.desirable for t in thumbs] == [want for _, want in LABELS]
    assert thumbs[0].source == (str(tmp_path / "t.jsonl"), 1)
    # CSV cells are text
    csv = write_csv(tmp_path / "t.csv", [{"prompt": "p", "completion": "c", "label": v} for v in ("up", "0", "TRUE")])
    assert [t.desirable for t in load_thumbs(csv)] == [True, False, True]
    # Parquet booleans
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["p", "q"], "completion": ["c", "d"], "label": [False, True]}),
                   tmp_path / "t.parquet")
    assert [t.desirable for t in load_thumbs(tmp_path / "t.parquet")] == [False, True]


@pytest.mark.parametrize("label, message", [
    ("maybe", "'label' is 'maybe'; use true or false, up or down, 1 or 0"), (2, "'label' is 2"),
    ("yes", "'label' is 'yes'"), ("", "'label' is empty"), (None, "'label' is empty"), (0.5, "'label' is 0.5")])
def test_other_labels_are_refused_naming_the_row(tmp_path, label, message):
    rows = thumbs_rows(6)
    rows[3]["label"] = label
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: row 4: {re.escape(message)}"):
        load_thumbs(path)
    rejects = []
    assert len(load_thumbs(path, "skip", rejects)) == 5
    assert [(r["row"], r["reason"].split(";")[0]) for r in rejects] == [(4, message.split(";")[0])]


def test_thumbs_pairs_and_rankings_mix_in_one_file(tmp_path):
    rows = [{"prompt": "a", "completion": "fine", "label": "up"},
            {"prompt": "b", "chosen": "yes please", "rejected": "go away"},
            {"prompt": "c", "responses": ["middle", "worst", "best"], "ranking": [2, 0, 1]}]
    thumbs = load_thumbs(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [(t.prompt, t.completion, t.desirable, t.source[1]) for t in thumbs] == [
        ("a", "fine", True, 1), ("b", "yes please", True, 2), ("b", "go away", False, 2),
        ("c", "best", True, 3), ("c", "worst", False, 3)]  # a ranking: its best and its worst


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "completion": "x", "label": "up", "chosen": "y", "rejected": "z"},
     "fills in 'completion' (a thumbs row) and 'chosen' (a preference)"),
    ({"prompt": "a", "response": "x"}, "needs 'completion' and 'label' (a completion with a thumbs up or down), "
                                       "or a preference"),
    ({"prompt": "a", "completion": "x"}, "no 'label' field"),
    ({"prompt": "a", "completion": "", "label": "up"}, "'completion' is empty"),
    ({"completion": "x", "label": "up"}, "no 'prompt' field"),
    ({"prompt": "a", "chosen": "x", "rejected": "x"}, "'chosen' and 'rejected' are the same text")])
def test_bad_rows_say_what_is_wrong(tmp_path, row, message):
    path = write_jsonl(tmp_path / "t.jsonl", [thumbs_rows(1)[0], row])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: row 2: {re.escape(message)}"):
        load_thumbs(path)


def test_mismatched_partners():
    # the nearest earlier row with another prompt, counting on from the end for the first rows
    assert mismatched_partners(["a", "a", "b", "c", "c"]) == [4, 4, 1, 2, 2]
    assert mismatched_partners(["a", "b", "a", "b"]) == [3, 0, 1, 2]
    assert mismatched_partners(["a", "a", "a"]) == [2, 0, 1]  # one prompt: the previous row
    assert mismatched_partners(["a"]) == [0] and mismatched_partners([]) == []


def test_examples_pair_each_prompt_with_another_rows_completion(tiny_llama, tmp_path):
    rows = [{"prompt": "p1", "completion": "good film", "label": True},
            {"prompt": "p1", "completion": "bad film", "label": False},
            {"prompt": "p2", "completion": "great plot", "label": True},
            {"prompt": "p3", "completion": "dull plot", "label": "down"}]
    cfg = config(tiny_llama, "kto", "lora", write_jsonl(tmp_path / "t.jsonl", rows), None)
    tok = load_tokenizer(tiny_llama)
    task = tasks.create(cfg, tok.pad_token_id)
    examples = task.file_examples(str(tmp_path / "t.jsonl"), tok)

    def sft(prompt, completion):
        return sft_example(tok, prompt, completion, cfg.data.chat_template, cfg.train.max_length)

    assert [e["desirable"] for e in examples] == [True, False, True, False]
    assert [e["completion"] for e in examples] == [sft(r["prompt"], r["completion"]) for r in rows]
    # p1 rows take p3's completion (from the end); p2 takes p1's last; p3 takes p2's
    assert [e["mismatched"] for e in examples] == [sft("p1", "dull plot"), sft("p1", "dull plot"),
                                                   sft("p2", "bad film"), sft("p3", "great plot")]


def test_repeats_are_dropped_and_conflicts_reported(tiny_llama, tmp_path, capsys):
    rows = thumbs_rows(40)
    rows += [dict(rows[0]), dict(rows[5]), {**rows[1], "label": not rows[1]["label"]}]  # two repeats, one conflict
    cfg = config(tiny_llama, "kto", "lora", write_jsonl(tmp_path / "t.jsonl", rows), None, "data.eval_fraction=0.25",
                 "kto.desirable_weight=2.0")
    data = tasks.prepare(cfg, load_tokenizer(tiny_llama))
    report = data.report
    assert report["rows_in"] == 43 and report["exact_duplicates_removed"] == 2 and report["rows_out"] == 41
    assert sum(report["rows_per_split"].values()) == 41 and data.mode == "thumbs"
    err = capsys.readouterr().err
    if rows[1]["prompt"] in {r["prompt"] for r in data.train.rows}:
        assert report["conflicting_labels"] == 1 and "labelled both desirable and undesirable" in err
    # desirable_weight 2 on balanced rows: the ratio is 2, outside the paper's [1, 4/3]
    assert re.search(r"desirable_weight \* n_desirable / \(undesirable_weight \* n_undesirable\) = \d\.\d\d, outside "
                     r"\[1, 4/3\]", err)


def test_config_checks_for_kto(tiny_llama, thumbs_jsonl):
    with pytest.raises(ConfigError) as err:
        config(tiny_llama, "kto", "lora", thumbs_jsonl, None, "kto.beta=0", "kto.desirable_weight=-1",
               "kto.undesirable_weight=0", "data.kfold=3")
    message = str(err.value)
    for needle in ("kto.beta: must be greater than 0, got 0", "kto.desirable_weight: must be greater than 0, got -1",
                   "kto.undesirable_weight: must be greater than 0, got 0", "kfold do not apply to task kto"):
        assert needle in message
    with pytest.raises(ConfigError, match="data.train: task kto needs a file of rows with prompt, completion and label"):
        config(tiny_llama, "kto", "lora", "chatterbot")
    with pytest.raises(ConfigError, match="did you mean"):
        config(tiny_llama, "kto", "lora", thumbs_jsonl, None, "kto.desirable_weigth=1.2")


def test_shipped_config_validates_and_its_data_reads_as_kto_rows():
    cfg = load_config(ROOT / "configs" / "smollm2-135m" / "kto-lora.yaml")
    assert cfg.task == "kto" and cfg.method.name == "lora" and cfg.kto.beta == 0.1
    thumbs = load_thumbs(ROOT / cfg.data.train)
    assert sum(t.desirable for t in thumbs) == sum(not t.desirable for t in thumbs) > 20
