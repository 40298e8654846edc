"""Properties of individual methods: exact identity at init, parity with peft, merge."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import T5Config, T5ForConditionalGeneration

from deltatune.errors import CannotMerge
from deltatune.methods import registry
from deltatune.tasks import registry as tasks
from deltatune.methods.houlsby import AdapterOptions
from deltatune.models import load_model
from deltatune.rundir import RunDir
from deltatune.train.loop import run_loop
from deltatune.train.run import build_job
from tests.helpers import config


def _tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0)).eval()


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("kind", ["bert", "llama", "t5"])
def test_adapters_leave_outputs_unchanged_at_init(kind, placement, request):
    if kind == "t5":
        model = _tiny_t5()
        inputs = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "decoder_input_ids": torch.tensor([[0, 8, 9]])}
    else:
        path = request.getfixturevalue(f"tiny_{kind}")
        model = load_model(path, "sequence", ["a", "b"], 0).eval()
        inputs = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        before = model(**inputs).logits
        adapted = registry.get("houlsby").apply(model, AdapterOptions(placement=placement),
                                                tasks.get("classification"))
        n_adapters = sum(1 for n, _ in adapted.named_modules() if n.endswith(".adapter"))
        after = adapted.eval()(**inputs).logits
    assert torch.equal(before, after)
    layers = {"bert": 2, "llama": 2, "t5": 2 + 2}[kind]  # t5: encoder + decoder blocks
    per_layer = {"houlsby": {"bert": 2, "llama": 2, "t5": None}, "pfeiffer": {"bert": 1, "llama": 1, "t5": None}}
    if kind != "t5":
        assert n_adapters == layers * per_layer[placement][kind]
    else:  # encoder: self-attn + ffn; decoder: self-attn + cross-attn + ffn
        assert n_adapters == (2 * 2 + 2 * 3 if placement == "houlsby" else 2 + 2)


def test_adapter_bottleneck_size_and_count(tiny_bert, cls_csv):
    cfg = config(tiny_bert, "classification", "houlsby", cls_csv, None, "method.bottleneck=4",
                 "method.train_layer_norms=false")
    job, _, _ = build_job(cfg, None)
    n = sum(p.numel() for p in job.model.parameters() if p.requires_grad)
    hidden, layers, labels, m = 32, 2, 2, 4
    adapter = (hidden * m + m) + (m * hidden + hidden)  # down and up projections with biases
    assert n == layers * 2 * adapter + hidden * labels + labels


PEFT_METHODS = ["lora", "ia3", "prefix", "prompt", "ptuning"]


def peft_reference(method: str, o, task: str):
    """What a peft user would write for the same options, from peft's own config classes (not our
    ``peft_config``): the task type, and the new classification head trained and saved beside the adapter."""
    from peft import (IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptEncoderReparameterizationType, PromptTuningConfig, PromptTuningInit, TaskType)

    common = {"task_type": TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
              "modules_to_save": ["classifier"] if task == "classification" else None}
    if method == "lora":
        return LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=o.target_modules, **common)
    if method == "ia3":
        return IA3Config(target_modules=o.target_modules, feedforward_modules=o.feedforward_modules, **common)
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=o.num_virtual_tokens, prefix_projection=o.projection,
                                  encoder_hidden_size=o.encoder_hidden_size or 32, **common)
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=o.num_virtual_tokens, prompt_tuning_init=PromptTuningInit.RANDOM,
                                  **common)
    return PromptEncoderConfig(num_virtual_tokens=o.num_virtual_tokens, encoder_hidden_size=o.encoder_hidden_size,
                               encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP, **common)


@pytest.mark.parametrize("method", PEFT_METHODS)
@pytest.mark.parametrize("kind,task", [("bert", "classification"), ("llama", "causal_lm")])
def test_wrapped_peft_methods_equal_peft_used_directly(method, kind, task, request):
    path = request.getfixturevalue(f"tiny_{kind}")
    data = request.getfixturevalue("cls_csv" if task == "classification" else "qa_jsonl")
    cfg = config(path, task, method, data)
    impl = registry.get(method)
    labels = ["negative", "positive"] if task == "classification" else None
    torch.manual_seed(1)
    ours = impl.apply(load_model(path, tasks.get(task).head, labels, 0), cfg.method.options, tasks.get(task)).eval()
    torch.manual_seed(1)
    base = load_model(path, tasks.get(task).head, labels, 0)
    theirs = get_peft_model(base, peft_reference(method, cfg.method.options, task)).eval()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    with torch.no_grad():
        assert torch.equal(ours(**inputs).logits, theirs(**inputs).logits)


MERGEABLE = [("bert", "classification", "lora"), ("bert", "classification", "ia3"),
             ("bert", "classification", "bitfit"), ("bert", "classification", "freeze"),
             ("llama", "causal_lm", "lora"), ("llama", "causal_lm", "ia3"),
             *[(kind, task, m) for m in ("vera", "loha", "lokr", "oft", "adalora")
               for kind, task in (("bert", "classification"), ("llama", "causal_lm"))]]


@pytest.mark.parametrize("kind,task,method", MERGEABLE, ids=["-".join(c) for c in MERGEABLE])
def test_merge_gives_a_plain_model_with_the_same_outputs(kind, task, method, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{kind}")
    data = request.getfixturevalue("cls_csv" if task == "classification" else "qa_jsonl")
    cfg = config(path, task, method, data, None, "train.max_steps=3", "train.lr=3e-2")
    job, _, _ = build_job(cfg, None)
    job.run = RunDir(tmp_path)
    run_loop(job)
    model = job.model.eval()
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    with torch.no_grad():
        expected = model(**batch).logits
        merged = registry.get(method).merge(model).eval()
        assert not any(k in n for n, _ in merged.named_parameters()
                       for k in ("lora_", "ia3_", "vera_", "hada_", "lokr_", "oft_", "base_layer"))
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["houlsby", "prefix", "prompt", "ptuning", "feature_extraction"])
def test_methods_that_cannot_merge_say_why_and_what_to_do(method, tiny_bert, cls_csv):
    job, _, _ = build_job(config(tiny_bert, "classification", method, cls_csv), None)
    with pytest.raises(CannotMerge) as err:
        registry.get(method).merge(job.model)
    assert "run directory" in str(err.value)


VARIANTS = [("prompt", ["method.init_text=good great film"]), ("ptuning", ["method.encoder=lstm"]),
            ("prefix", ["method.projection=true"]),
            ("houlsby", ["method.placement=pfeiffer", "method.non_linearity=gelu", "method.bottleneck=3"])]


@pytest.mark.parametrize("method,options", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_method_variants_train_and_reload(method, options, tiny_bert, cls_csv, tmp_path):
    cfg = config(tiny_bert, "classification", method, cls_csv, None, "train.max_steps=3", "train.lr=1e-2", *options)
    job, prepared, tok = build_job(cfg, None)
    impl = registry.get(method)
    if method == "prompt":  # text initialisation: the virtual tokens start as that text's embeddings
        words = tok("good great film", add_special_tokens=False)["input_ids"]
        start = job.model.prompt_encoder["default"].embedding.weight[: len(words)]
        expected = job.model.get_base_model().get_input_embeddings().weight[words]
        torch.testing.assert_close(start, expected)
    if method == "ptuning":
        assert isinstance(job.model.prompt_encoder["default"].lstm_head, torch.nn.LSTM)
    job.run = RunDir(tmp_path)
    run_loop(job)
    impl.save_delta(job.model, tmp_path / "delta", cfg.method.options)
    fresh = load_model(tiny_bert, "sequence", prepared.labels, tok.pad_token_id)
    reloaded = impl.load_delta(fresh, tmp_path / "delta", cfg.method.options, tasks.get("classification")).eval()
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    with torch.no_grad():
        got, want = reloaded(**batch).logits, job.model.eval()(**batch).logits
    if method == "ptuning":  # peft saves the LSTM encoder's output; recomputing it differs in the last bits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning", "lora", "ia3", "houlsby"])
@pytest.mark.parametrize("kind,task,data", [("llama", "causal_lm", "qa_jsonl"), ("bert", "classification", "cls_csv")])
def test_baseline_is_the_untouched_base_model(method, kind, task, data, request, tmp_path):
    """Soft prompts change outputs from the start; the baseline must still be the base model's."""
    from deltatune.train.run import train

    model, data = request.getfixturevalue(f"tiny_{kind}"), request.getfixturevalue(data)
    reference = train(config(model, task, "full", data, tmp_path / "full", "train.max_steps=1"))
    run = train(config(model, task, method, data, tmp_path / method, "train.max_steps=1"))
    import json

    base = json.loads((reference.path / "baseline.json").read_text())
    ours = json.loads((run.path / "baseline.json").read_text())
    assert ours["loss"] == pytest.approx(base["loss"], abs=1e-6)
