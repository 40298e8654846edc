"""LoRA's EVA start (method.init: eva) on the tiny BERT classifier: the A's and ranks are peft's own from the
same batches, padding is left out, the rank budget is kept, the saved adapter has the ranks and reloads and
merges, a resumed run rebuilds the start without reading the data again, and misuse is refused by key."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError, RunError
from deltatune.eval.evaluate import forward
from deltatune.methods import registry
from deltatune.methods.lora import Lora, LoraOptions
from deltatune.models import load_model
from deltatune.rundir import RunDir
from deltatune.tasks import registry as tasks
from deltatune.train import data_start
from deltatune.train.loop import first_batches, run_loop
from deltatune.train.run import build_job, resume, train
from tests.helpers import config

pytestmark = pytest.mark.usefixtures("one_thread")  # peft's incremental SVD: small QRs, slow across busy threads

EVA = ["method.init=eva", "method.eva_batches=2"]  # r=8 on query and value: peft moves ranks to 9/7 here


def _job(tiny_bert, cls_csv, tmp_path, *extra):
    job, prepared, tokenizer = build_job(config(tiny_bert, "classification", "lora", cls_csv, None, *EVA, *extra),
                                         None)
    job.run = RunDir(tmp_path)
    job.run.path.mkdir(parents=True, exist_ok=True)
    return job, prepared, tokenizer


def _lora_a(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def _ranks(model) -> dict[str, int]:
    return {n: p.shape[0] for n, p in _lora_a(model).items()}


def _padded(inputs: dict, extra: int, pad_id: int, counted: bool) -> dict:
    """The batch with ``extra`` more padding positions per row: masked out, or (``counted``) unmasked."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    ids = torch.cat([ids, torch.full((len(ids), extra), pad_id)], 1)
    mask = torch.cat([mask, torch.full((len(mask), extra), int(counted))], 1)
    return {"input_ids": ids, "attention_mask": mask}


def test_the_start_is_peft_eva_on_the_loops_first_batches_and_ignores_padding(tiny_bert, cls_csv, tmp_path):
    job, _, _ = _job(tiny_bert, cls_csv, tmp_path / "ours")
    rng = torch.get_rng_state()
    assert data_start.settle_start(job, job.run)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's dropout draws are a run's without the pass
    ours = _lora_a(job.model)
    assert sorted(set(_ranks(job.model).values())) == [7, 9]  # ranks moved: the check below is not trivial

    def peft_start(batches: list[dict]):
        other, _, _ = _job(tiny_bert, cls_csv, tmp_path / "peft")
        peft.initialize_lora_eva_weights(other.model, dataloader=batches, show_progress_bar=False)
        return other.model

    batches = [b["inputs"] for b in first_batches(job, 2)]
    theirs = peft_start(batches)
    assert theirs.peft_config["default"].rank_pattern == job.model.peft_config["default"].rank_pattern != {}
    assert _lora_a(theirs).keys() == ours.keys()
    for name, a in _lora_a(theirs).items():
        assert torch.equal(a, ours[name]), name
    padded = peft_start([_padded(b, 5, job.pad_id, counted=False) for b in batches])
    for name, a in _lora_a(padded).items():
        torch.testing.assert_close(a, ours[name], rtol=0, atol=1e-5)
    counted = peft_start([_padded(b, 5, job.pad_id, counted=True) for b in batches])
    assert any(a.shape != ours[n].shape or (a - ours[n]).abs().max() > 1e-3 for n, a in _lora_a(counted).items())


def test_a_layer_that_reads_one_vector_per_row_gets_its_start(tiny_bert, cls_csv, tmp_path):
    """BERT's pooler (``dense`` matches it) reads the first token's state, (rows, hidden): not masked by position
    (peft's default indexing fails on it), its A from those vectors."""
    too_few = ["method.target_modules=[value,dense]", "train.batch_size=8"]  # 8 pooled rows, 2 x 8 components
    job, _, _ = _job(tiny_bert, cls_csv, tmp_path / "few", *too_few)
    with pytest.raises(RunError, match="method.init: eva: .*did not settle.*Raise train.batch_size"):
        data_start.settle_start(job, job.run)
    job, _, _ = _job(tiny_bert, cls_csv, tmp_path, "method.target_modules=[value,dense]", "train.batch_size=16")
    layers = len(_ranks(job.model))
    data_start.settle_start(job, job.run)
    start = load_file(job.run.path / data_start.FOLDER / data_start.FILE)  # layer -> A (rank x inputs)
    assert len(start) == layers and start["base_model.model.bert.pooler.dense"].shape[1] == 32
    assert sum(a.shape[0] for a in start.values()) == 8 * layers


def test_the_rank_budget_is_kept_and_the_count_is_peft_s(tiny_bert, cls_csv, tmp_path):
    job, _, _ = _job(tiny_bert, cls_csv, tmp_path)
    hidden, layers, labels, r = 32, 2, 2, 8
    head = hidden * labels + labels

    def trainable() -> int:
        return sum(p.numel() for p in job.model.parameters() if p.requires_grad)

    assert trainable() == layers * 2 * r * (hidden + hidden) + head  # before the pass: the budget, r everywhere
    data_start.settle_start(job, job.run)
    ranks = _ranks(job.model)
    assert sum(ranks.values()) == layers * 2 * r  # moved between layers, the total kept
    assert trainable() == job.model.get_nb_trainable_parameters()[0] == \
        sum(n * (hidden + hidden) for n in ranks.values()) + head
    scaling = {n: m.scaling["default"] for n, m in job.model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert set(scaling.values()) == {16.0 / r}  # alpha moves with the rank: alpha / r stays


def test_a_run_saves_the_ranks_reloads_with_peft_and_merges(tiny_bert, cls_csv, tmp_path):
    job, prepared, tokenizer = _job(tiny_bert, cls_csv, tmp_path / "run", "train.max_steps=4", "train.lr=3e-2",
                                    "train.warmup_ratio=0")
    data_start.settle_start(job, job.run)
    run_loop(job)
    impl, model = registry.get("lora"), job.model.eval()
    impl.save_delta(model, tmp_path / "delta", job.options)
    saved = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"]
    assert {r: saved["rank_pattern"].get(n.split(".lora_A")[0].removeprefix("base_model.model."), saved["r"])
            for n, r in _ranks(model).items()} == {r: r for r in _ranks(model).values()}
    batch = job.task.collate(job.eval_examples[:8])
    with torch.no_grad():
        want = forward(model, batch["inputs"], batch["targets"], "classification")
        fresh = load_model(tiny_bert, "sequence", prepared.labels, tokenizer.pad_token_id)
        by_peft = peft.PeftModel.from_pretrained(fresh, tmp_path / "delta").eval()
        assert _ranks(by_peft) == _ranks(model)
        torch.testing.assert_close(forward(by_peft, batch["inputs"], batch["targets"], "classification"), want,
                                   rtol=0, atol=1e-5)
        merged = impl.merge(model).eval()
        torch.testing.assert_close(forward(merged, batch["inputs"], batch["targets"], "classification"), want,
                                   rtol=0, atol=1e-4)


def test_an_interrupted_run_resumes_to_the_uninterrupted_one_without_a_second_pass(tiny_bert, cls_csv, tmp_path,
                                                                                  monkeypatch):
    common = ["train.epochs=1", "train.save_every=2", "train.lr=2e-3", *EVA]
    straight = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "a", *common))

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "b", *common), callbacks=(interrupt,))

    def again(*args):
        raise AssertionError("the resumed run read the data for its start again")

    monkeypatch.setattr(Lora, "data_start", again)
    resumed = resume(tmp_path / "b")
    a, b = (load_file(run.delta / "adapter_model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    configs = [json.loads((run.delta / "adapter_config.json").read_text()) for run in (straight, resumed)]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"] != {}


BAD = [("method.eva_rho=0.5", "method.eva_rho: must be a number of at least 1"),
       ("method.eva_batches=0", "method.eva_batches: must be at least 1")]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_options_are_refused_with_the_key(override, message, tiny_bert, cls_csv):
    with pytest.raises(ConfigError, match=message):
        config(tiny_bert, "classification", "lora", cls_csv, None, "method.init=eva", override)


def test_tasks_it_cannot_start_are_refused_by_name(tiny_llama, tiny_t5):
    impl, options = registry.get("lora"), LoraOptions(init="eva")
    with pytest.raises(ConfigError, match="method.init: eva reads the training batches before .* ppo samples"):
        impl.apply(load_model(tiny_llama, "causal"), options, tasks.get("ppo"))
    with pytest.raises(ConfigError, match="method.init: eva leaves the padding out .* seq2seq's decoder"):
        impl.apply(load_model(tiny_t5, "seq2seq"), options, tasks.get("seq2seq"))
