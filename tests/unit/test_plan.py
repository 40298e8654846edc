"""deltatune plan: the exact parts (counts, planned batch widths, how terms scale, suggestions).
Timings are never asserted."""

import dataclasses
import warnings

import pytest
from accelerate import Accelerator

from deltatune.eval.evaluate import task_for
from deltatune.methods import registry
from deltatune.tasks import registry as tasks
from deltatune.models import count_parameters, load_model, load_tokenizer
from deltatune.plan import (BF16_RESIDENT_MB, BF16_SAVED_SHARE, FUSED_SAVED_SHARE, MB, RSS_PER_SAVED_BYTE, Batches,
                            memory_terms, model_shape, plan, planned_batches, render, step_flops)
from deltatune.train.loop import _epoch_loader
from deltatune.train.run import build_job
from tests.helpers import config


def _real_counts(path, task, method_name, labels):
    method = registry.get(method_name)
    options = method.Options()
    model = load_model(path, tasks.get(task).head, labels, load_tokenizer(path).pad_token_id, **method.load_kwargs(options))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return count_parameters(method.apply(model, options, tasks.get(task)))


@pytest.mark.parametrize("method", ["full", "freeze", "bitfit", "houlsby", "lora", "ia3", "prompt",
                                    "feature_extraction"])
def test_counts_equal_the_real_model_bert(tiny_bert, method):
    shape = model_shape(tiny_bert, task_for("classification", labels=["a", "b"]), method, registry.get(method).Options())
    trainable, total = _real_counts(tiny_bert, "classification", method, ["a", "b"])
    assert (shape.trainable_params, shape.total_params) == (trainable, total)
    assert shape.trains_base == (method in ("full", "freeze"))  # adapters and biases are not base weights
    assert (shape.adapter_floats > 0) == (method == "lora")


@pytest.mark.parametrize("method", ["full", "lora", "houlsby", "prefix", "freeze"])
def test_counts_equal_the_real_model_llama(tiny_llama, method):
    shape = model_shape(tiny_llama, task_for("causal_lm"), method, registry.get(method).Options())
    assert (shape.trainable_params, shape.total_params) == _real_counts(tiny_llama, "causal_lm", method, None)


def test_qlora_counts_equal_the_real_quantized_model(tiny_llama64):
    shape = model_shape(tiny_llama64, task_for("causal_lm"), "qlora", registry.get("qlora").Options())
    assert (shape.trainable_params, shape.total_params) == _real_counts(tiny_llama64, "causal_lm", "qlora", None)
    fp32 = model_shape(tiny_llama64, task_for("causal_lm"), "lora", registry.get("lora").Options())
    assert shape.weight_bytes < 0.5 * fp32.weight_bytes  # the layers' linear weights take 4 bits


def test_planned_widths_are_the_loops_own(tiny_bert, cls_csv, tmp_path):
    for extra in ([], ["train.group_by_length=true"]):
        cfg = config(tiny_bert, "classification", "lora", cls_csv, None, "train.epochs=2", *extra)
        job, data, _ = build_job(cfg, None)
        real = [b["inputs"]["input_ids"].shape[1] for epoch in range(2)
                for b in _epoch_loader(job, epoch, Accelerator(cpu=True))]
        assert planned_batches(data.train.examples, data.eval.examples, cfg.train).widths == real
    cfg = config(tiny_bert, "classification", "lora", cls_csv, None, "train.max_steps=3", "train.grad_accum=2")
    assert len(planned_batches(data.train.examples, [], cfg.train).widths) == 6


def _terms(shape, train, size=4, widths=(20, 30), task="causal_lm", predicted=(40, 50)):
    return memory_terms(shape, Batches(size, list(widths), list(predicted), 1000), train, tasks.get(task))


def test_memory_terms_scale(tiny_llama, qa_jsonl):
    train = config(tiny_llama, "causal_lm", "lora", qa_jsonl).train
    plain = dataclasses.replace(train, chunked_loss=False)
    shape = model_shape(tiny_llama, task_for("causal_lm"), "lora", registry.get("lora").Options())
    base = _terms(shape, plain)
    double = _terms(shape, plain, size=8)
    assert double["activations"] == pytest.approx(2 * base["activations"])
    assert double["logits"] == pytest.approx(2 * base["logits"])
    assert base["logits"] == pytest.approx(4.0 * 4 * (4 * 30) * shape.vocab)  # 4 fp32 copies of the widest batch
    for key in ("weights", "gradients", "optimizer", "framework", "data"):
        assert double[key] == base[key]
    assert base["gradients"] == 4 * shape.trainable_params and base["optimizer"] == 8 * shape.trainable_params
    ckpt = _terms(shape, dataclasses.replace(plain, gradient_checkpointing=True))
    assert ckpt["activations"] < base["activations"] / 1.5
    chunked = _terms(shape, train, predicted=(40, 50))
    assert chunked["logits"] == pytest.approx(4.0 * 4 * 50 * shape.vocab)  # only predicted positions, one batch
    assert _terms(shape, train, size=8)["logits"] == chunked["logits"]  # does not grow with the batch


def test_fused_kernels_plan_their_measured_share_of_the_saved_activations(tiny_llama, qa_jsonl):
    train = config(tiny_llama, "causal_lm", "lora", qa_jsonl).train  # the default kernels
    shape = model_shape(tiny_llama, task_for("causal_lm"), "lora", registry.get("lora").Options())
    batches = Batches(4, [20, 30], [40, 50], 1000)

    def activations(t, malloc):
        return memory_terms(shape, batches, t, tasks.get("causal_lm"), malloc)["activations"]

    plain = activations(dataclasses.replace(train, kernels=[]), "system")
    assert activations(train, "system") == plain  # glibc's heap keeps the freed transients
    fused = activations(train, "tcmalloc") / RSS_PER_SAVED_BYTE["tcmalloc"]["decoder"]
    assert fused == pytest.approx(FUSED_SAVED_SHARE[("decoder", False)] * plain / RSS_PER_SAVED_BYTE["system"]["decoder"])
    freed = dataclasses.replace(train, return_freed_memory=True)
    assert activations(freed, "system") == pytest.approx(FUSED_SAVED_SHARE[("decoder", False)] * plain)
    partial = dataclasses.replace(train, kernels=["swiglu"])  # planned as none (not counted)
    assert activations(partial, "tcmalloc") / RSS_PER_SAVED_BYTE["tcmalloc"]["decoder"] == pytest.approx(
        plain / RSS_PER_SAVED_BYTE["system"]["decoder"])


def test_bf16_autocast_is_planned_with_its_saved_share_weight_copies_and_bf16_products(tiny_llama, qa_jsonl):
    train = config(tiny_llama, "causal_lm", "lora", qa_jsonl).train
    shape = model_shape(tiny_llama, task_for("causal_lm"), "lora", registry.get("lora").Options())
    batches = Batches(4, [20, 30], [40, 50], 1000)
    fp32, bf16 = (memory_terms(shape, batches, train, tasks.get("causal_lm"), "tcmalloc", bf16=on) for on in (False, True))
    per_byte = RSS_PER_SAVED_BYTE["tcmalloc"]["decoder"]
    assert bf16["activations"] == pytest.approx(
        fp32["activations"] * BF16_SAVED_SHARE[("decoder", False)] + 2.0 * shape.layer_linear * per_byte)
    assert bf16["framework"] - fp32["framework"] == pytest.approx(BF16_RESIDENT_MB * MB)
    assert {k: v for k, v in bf16.items() if k not in ("activations", "framework")} == \
        {k: v for k, v in fp32.items() if k not in ("activations", "framework")}
    on = plan(config(tiny_llama, "causal_lm", "lora", qa_jsonl, None, "train.bf16=true"), gflops=1e-3)
    off = plan(config(tiny_llama, "causal_lm", "lora", qa_jsonl, None, "train.bf16=false"), gflops=1e-3)
    assert (on.precision, off.precision) == ("bf16", "fp32")
    assert on.flops_per_step == off.flops_per_step  # the same products, at bf16's speed and efficiency
    assert on.seconds_per_step != off.seconds_per_step
    assert "0 bf16 GFLOP/s measured" in render(on) and "fp32 GFLOP/s" in render(off)


def test_plan_is_for_the_malloc_train_will_run_on(tmp_path, monkeypatch):
    from deltatune import allocator

    monkeypatch.setattr(allocator, "LIBRARY_DIRS", (tmp_path,))
    assert allocator.planned({}) == "system"  # no tcmalloc on the machine
    assert allocator.planned({"LD_PRELOAD": "/opt/libtcmalloc.so"}) == "tcmalloc"  # preloaded by the user
    (tmp_path / allocator.TCMALLOC).write_bytes(b"")
    assert allocator.planned({}) == "tcmalloc"
    assert allocator.planned({allocator.ENV: "system"}) == "system"


def test_flops_count_weight_gradients_only_where_weights_train(tiny_llama, qa_jsonl):
    train = config(tiny_llama, "causal_lm", "full", qa_jsonl, None, "train.chunked_loss=false").train
    full = model_shape(tiny_llama, task_for("causal_lm"), "full", registry.get("full").Options())
    frozen = dataclasses.replace(full, trainable_layer_linear=0, head_trains=False)
    batches = Batches(2, [10], [0], 0)
    tokens = 20
    weight_grads = 2.0 * full.layer_linear * tokens + 2.0 * full.hidden * full.vocab * tokens
    assert step_flops(full, batches, train, tasks.get("causal_lm")) - step_flops(frozen, batches, train, tasks.get("causal_lm")) \
        == pytest.approx(weight_grads)
    forward = 2.0 * full.layer_linear * tokens + 4.0 * 2 * 10**2 * full.hidden * full.layers
    ckpt = dataclasses.replace(train, gradient_checkpointing=True)
    assert step_flops(full, batches, ckpt, tasks.get("causal_lm")) - step_flops(full, batches, train, tasks.get("causal_lm")) \
        == pytest.approx(forward)


def test_suggestions_when_memory_is_short(tiny_llama, qa_jsonl, monkeypatch):
    monkeypatch.setenv("DELTATUNE_ALLOCATOR", "system")  # planned as unfused: the tiny batch's logits set the peak
    cfg = config(tiny_llama, "causal_lm", "lora", qa_jsonl, None, "train.batch_size=8", "train.chunked_loss=false")
    roomy = plan(cfg, memory_gb=1000, gflops=10.0)
    assert roomy.fits and roomy.suggestions == []
    tight_mb = roomy.peak_mb - 0.5 * (roomy.memory_mb["activations"] + roomy.memory_mb["logits"])
    short = plan(cfg, memory_gb=tight_mb / 1024, gflops=10.0)
    assert not short.fits
    changes = {" ".join(s.change): s for s in short.suggestions}
    assert {"train.batch_size=4 train.grad_accum=2", "train.gradient_checkpointing=true",
            "train.chunked_loss=true", "method.name=qlora"} <= set(changes)
    for key in ("train.batch_size=4 train.grad_accum=2", "train.gradient_checkpointing=true",
                "train.chunked_loss=true"):
        assert changes[key].peak_mb < short.peak_mb
    assert "does NOT fit" in render(short) and "train.gradient_checkpointing=true" in render(short)


@pytest.mark.parametrize("name", tasks.names())
def test_the_planned_model_is_the_one_the_task_trains(name, tiny_bert, tiny_llama, tiny_t5):
    """plan counts on the model class (and head size) that training builds, for every task."""
    from transformers import AutoConfig

    from deltatune.plan import _meta_model

    task = task_for(name, labels=["a", "b"])  # labels only matter to a task with a new head
    path = {"sequence": tiny_bert, "token": tiny_bert, "causal": tiny_llama, "seq2seq": tiny_t5}[task.head]
    planned, real = _meta_model(AutoConfig.from_pretrained(path), task), task.build_model(path)
    assert type(planned) is type(real)
    assert count_parameters(planned) == count_parameters(real)


def test_pair_tasks_are_refused_by_name_not_with_a_traceback(tiny_llama, tmp_path, capsys):
    from deltatune.cli import main
    from tests.conftest import write_jsonl
    from tests.unit.test_reward_dpo import preference_rows

    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(40))
    assert main(["plan", f"model={tiny_llama}", "task=dpo", f"data.train={prefs}", "method.name=lora"]) == 2
    err = capsys.readouterr().err
    assert "examples hold several" in err and "train.max_steps=5" in err
