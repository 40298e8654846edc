"""Every method x every task it supports, on tiny random models.

Each case trains a few steps and checks: the loss falls, exactly the intended parameters
change (state dicts compared before and after), and the saved delta reloads to identical outputs.
"""

from __future__ import annotations

import pytest
import torch

from deltatune.errors import DeltatuneError
from deltatune.eval.evaluate import evaluate, forward
from deltatune.methods import registry
from deltatune.models import load_model
from deltatune.rundir import RunDir
from deltatune.tasks import registry as tasks
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job
from tests.conftest import sentiment_rows, write_csv, write_jsonl
from tests.helpers import config


def expected_trainable(method: str, name: str) -> bool:
    """The intended delta of each method, by parameter name (tiny models have 2 layers)."""
    return {
        "full": True,
        # T5: the stack found is encoder.block, so its top block, the final norm and the whole decoder train.
        "freeze": (name.startswith(("encoder.block.1.", "encoder.final", "decoder.")) if name.startswith(("encoder.", "decoder.", "shared"))
                   else any(k in name for k in ("layer.1.", "layers.1.", "pooler.", "classifier.", "score."))
                   or name == "model.norm.weight"),
        "bitfit": name.endswith("bias") or name.startswith("classifier."),
        "lora": "lora_" in name or "modules_to_save" in name,
        "qlora": "lora_" in name or "modules_to_save" in name,
        "feature_extraction": name.startswith("head."),
        "houlsby": (".adapter." in name or "norm" in name.lower() or "layer_norm" in name
                    or name.startswith(("classifier.", "score."))),
        "ia3": "ia3_l" in name or "modules_to_save" in name,
        "vera": "vera_lambda_" in name or "modules_to_save" in name,
        "loha": "hada_" in name or "modules_to_save" in name,
        "lokr": "lokr_" in name or "modules_to_save" in name,
        "oft": "oft_R" in name or "modules_to_save" in name,
        "prefix": "prompt_encoder" in name or "modules_to_save" in name,
        "prompt": "prompt_encoder" in name or "modules_to_save" in name,
        "ptuning": "prompt_encoder" in name or "modules_to_save" in name,
    }[method]


SOFT_PROMPTS = [("prefix", 2e-2), ("prompt", 5e-2), ("ptuning", 2e-2)]
CASES = [("bert", "classification", m, lr) for m, lr in
         [("full", 1e-3), ("freeze", 2e-3), ("bitfit", 1e-2), ("lora", 5e-3), ("feature_extraction", 5e-2),
          ("houlsby", 5e-3), ("ia3", 3e-2), *SOFT_PROMPTS]]
# Not adalora: its saved delta keeps only the unmasked ranks, so the reload's sums have fewer (zero) terms and
# equal up to rounding (tests/methods/test_peft_family.py compares to 1e-6).
CASES += [("bert", "classification", m, lr) for m, lr in
          [("vera", 3e-2), ("loha", 5e-3), ("lokr", 5e-3), ("oft", 5e-3)]]
CASES += [("llama", "causal_lm", m, lr) for m, lr in
          [("full", 3e-3), ("freeze", 3e-3), ("lora", 1e-2), ("houlsby", 1e-2), ("ia3", 5e-2), *SOFT_PROMPTS]]
CASES += [("llama", "classification", m, lr) for m, lr in [("lora", 5e-3), ("full", 1e-3), ("houlsby", 5e-3)]]
CASES += [("bert", "token_classification", m, lr) for m, lr in
          [("full", 1e-3), ("freeze", 2e-3), ("bitfit", 1e-2), ("lora", 5e-3), ("houlsby", 5e-3), ("ia3", 3e-2),
           *SOFT_PROMPTS]]
CASES += [("t5", "seq2seq", m, lr) for m, lr in
          [("full", 3e-3), ("freeze", 3e-3), ("lora", 1e-2), ("houlsby", 1e-2), ("ia3", 5e-2), *SOFT_PROMPTS]]
CASES += [("llama64", "causal_lm", "qlora", 1e-2), ("llama64", "classification", "qlora", 5e-3),
          ("t5", "seq2seq", "qlora", 1e-2)]
DATA = {"classification": "cls_csv", "causal_lm": "qa_jsonl", "token_classification": "tagged_jsonl",
        "seq2seq": "qa_jsonl"}


@pytest.mark.parametrize("model_kind,task,method,lr", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_method_trains_exactly_its_delta_and_reloads(model_kind, task, method, lr, request, tmp_path):
    model_path = request.getfixturevalue(f"tiny_{model_kind}")
    data = request.getfixturevalue(DATA[task])
    extra = ["train.epochs=4", f"train.lr={lr}", "train.warmup_ratio=0"]
    if method == "freeze":
        extra.append("method.trainable_layers=1")
    cfg = config(model_path, task, method, data, None, *extra)
    job, prepared, tokenizer = build_job(cfg, None)
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    model = job.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if expected_trainable(method, n)}

    def loss() -> float:
        return evaluate(model, job.train_examples, task, 16, job.pad_id, job.labels)["loss"]

    loss_before = loss()
    run_loop(job)
    assert loss() < loss_before - 1e-3

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable

    # Save the delta, load it into a fresh base, and get bit-identical outputs.
    impl = registry.get(method)
    impl.save_delta(model, tmp_path / "delta", cfg.method.options)
    fresh = load_model(model_path, tasks.get(task).head, prepared.labels, tokenizer.pad_token_id,
                       **impl.load_kwargs(cfg.method.options))
    reloaded = impl.load_delta(fresh, tmp_path / "delta", cfg.method.options, tasks.get(task))
    batch = job.task.collate(job.eval_examples[:8])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = forward(model, batch["inputs"], batch["targets"], task)
        assert torch.equal(expected, forward(reloaded, batch["inputs"], batch["targets"], task))


def test_lora_trainable_count_follows_the_formula(tiny_bert, cls_csv):
    cfg = config(tiny_bert, "classification", "lora", cls_csv, None, "method.r=4")
    job, _, _ = build_job(cfg, None)
    n = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    hidden, layers, labels = 32, 2, 2
    lora = layers * 2 * 4 * (hidden + hidden)  # query and value: r * (d_in + d_out) each
    head = hidden * labels + labels
    assert n == lora + head


def test_bitfit_refuses_a_model_without_biases(tiny_llama, qa_jsonl):
    cfg = config(tiny_llama, "causal_lm", "bitfit", qa_jsonl)
    with pytest.raises(DeltatuneError, match="has no bias terms.*use method.name=lora"):
        build_job(cfg, None)


def test_freeze_rejects_more_layers_than_the_model_has(tiny_bert, cls_csv):
    cfg = config(tiny_bert, "classification", "freeze", cls_csv, None, "method.trainable_layers=5")
    with pytest.raises(DeltatuneError, match="the model has 2 layers"):
        build_job(cfg, None)


def test_feature_cache_is_reused(tiny_bert, cls_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    from deltatune.methods.feature_classifier import FeatureClassifier

    cfg = config(tiny_bert, "classification", "feature_extraction", cls_csv)
    job, _, _ = build_job(cfg, None)
    shards = list((tmp_path / "cache" / "features").glob("*/*.safetensors"))
    assert len(shards) == 2  # train and eval, each encoded once
    calls = []
    monkeypatch.setattr(FeatureClassifier, "encode", lambda *a: calls.append(1))
    job2, _, _ = build_job(cfg, None)  # a second run: every vector comes from disk
    assert calls == []
    torch.testing.assert_close(job2.train_examples[0]["features"], job.train_examples[0]["features"])
    # Another task on the same texts (different labels) reuses the same vectors.
    relabeled = write_csv(tmp_path / "other_task.csv", [{"text": r["text"], "label": f"t{i % 3}"}
                                                         for i, r in enumerate(sentiment_rows(64))])
    job3, _, _ = build_job(config(tiny_bert, "classification", "feature_extraction", relabeled), None)
    assert calls == [] and job3.labels == ["t0", "t1", "t2"]


def test_plain_text_continuation(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": r["text"]} for r in sentiment_rows(40)])
    cfg = config(tiny_llama, "causal_lm", "lora", data)
    job, prepared, _ = build_job(cfg, None)
    assert prepared.mode == "text"
    example = job.train_examples[0]
    assert example["labels"] == example["input_ids"]  # every token is a target
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    before = evaluate(job.model, job.eval_examples, "causal_lm", 16, job.pad_id)["loss"]
    best, _ = run_loop(job)
    assert best["loss"] < before
