"""Memory and speed options change how a step is computed, not what it computes.

Chunked cross-entropy and gradient checkpointing give the plain loss and gradients (to float
rounding); bf16 autocast gives them to bf16 rounding. All on tiny random models.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaForCausalLM

from deltatune.configure import load_config
from deltatune.data.collate import collate, collate_labelled
from deltatune.data.examples import IGNORE
from deltatune.data.pack import pack
from deltatune.errors import ConfigError
from deltatune.eval.evaluate import decoder_parts, evaluate, forward_loss
from deltatune.losses import chunked_causal_lm_loss
from deltatune.methods import registry
from deltatune.methods.lora import LoraOptions
from deltatune.models import load_model
from deltatune.tasks import registry as tasks
from deltatune.train import loop, precision
from deltatune.train.loop import enable_gradient_checkpointing
from deltatune.train.precision import bf16_enabled

TOL = dict(rtol=1e-5, atol=1e-5)


def examples(n: int = 6, longest: int = 14, seed: int = 0) -> list[dict]:
    """Causal-LM examples of random length, each with a masked prompt of random length."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(10, 40) for _ in range(rng.randint(3, longest))]
        prompt = rng.randrange(1, len(ids))
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def lora(model, task: str = "causal_lm", **options):
    """LoRA with B made non-zero, so that every adapter matrix gets a gradient."""
    torch.manual_seed(1)  # the same adapters every time
    model = registry.get("lora").apply(model, LoraOptions(dropout=0.0, **options), tasks.get(task))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model.train()


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks
    total, count = compute()
    loss = total / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOL, msg=name)


@pytest.fixture
def llama_lora(tiny_llama):
    return lora(load_model(tiny_llama, "causal"))


def plain(model, batch, task="causal_lm"):
    return lambda: forward_loss(model, batch["inputs"], batch["targets"], task, chunked=False)


def chunked(model, batch, task="causal_lm"):
    return lambda: forward_loss(model, batch["inputs"], batch["targets"], task, chunked=True)


@pytest.mark.parametrize("chunk", [1, 7, 16, 10_000])  # 7 divides neither the length nor the target count
def test_chunked_loss_and_grads_equal_the_plain_ones(llama_lora, chunk):
    batch = collate(examples(), pad_id=0)
    assert batch["targets"].shape[1] % 7 and int((batch["targets"][:, 1:] != IGNORE).sum()) % 7
    body, head = decoder_parts(llama_lora)

    def by_chunks():
        hidden = body(**batch["inputs"], use_cache=False).last_hidden_state
        return chunked_causal_lm_loss(hidden, head, batch["targets"], chunk_tokens=chunk)

    assert_same(loss_and_grads(llama_lora, plain(llama_lora, batch)), loss_and_grads(llama_lora, by_chunks))


def test_chunked_loss_on_packed_rows(llama_lora):
    batch = collate(pack(examples(12), 24), pad_id=0)
    assert "position_ids" in batch["inputs"]
    assert_same(loss_and_grads(llama_lora, plain(llama_lora, batch)),
                loss_and_grads(llama_lora, chunked(llama_lora, batch)))


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
def test_chunked_loss_with_a_lora_head_and_with_tied_full_fine_tuning(tiny_llama):
    batch = collate(examples(), pad_id=0)
    with_head = lora(load_model(tiny_llama, "causal"), target_modules=["q_proj", "v_proj", "lm_head"])
    assert "lora" in type(decoder_parts(with_head)[1]).__module__  # the head the chunks use is the wrapped one
    assert_same(loss_and_grads(with_head, plain(with_head, batch)), loss_and_grads(with_head, chunked(with_head, batch)))
    full = load_model(tiny_llama, "causal").train()  # lm_head is the (trained) input embedding
    assert full.lm_head.weight is full.model.embed_tokens.weight
    assert_same(loss_and_grads(full, plain(full, batch)), loss_and_grads(full, chunked(full, batch)))


def test_which_heads_take_the_fused_cross_entropy(tiny_llama, llama_lora, monkeypatch):
    """A plain linear head, in fp32 or under bf16 autocast: fused (the tests above and test_losses check its loss
    and gradients); a LoRA-wrapped head: checkpointed chunks."""
    from deltatune import losses

    calls = []
    fused = losses.linear_cross_entropy
    monkeypatch.setattr(losses, "linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    batch = collate(examples(), pad_id=0)
    chunked(llama_lora, batch)()
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked(llama_lora, batch)()
    assert len(calls) == 2
    with_head = lora(load_model(tiny_llama, "causal"), target_modules=["q_proj", "v_proj", "lm_head"])
    chunked(with_head, batch)()
    with torch.no_grad():
        chunked(llama_lora, batch)()
    assert len(calls) == 2


def test_chunked_loss_without_targets_keeps_the_graph(llama_lora):
    batch = collate(examples(2), pad_id=0)
    body, head = decoder_parts(llama_lora)
    hidden = body(**batch["inputs"]).last_hidden_state
    total, count = chunked_causal_lm_loss(hidden, head, torch.full_like(batch["targets"], IGNORE))
    assert count == 0 and total.item() == 0.0
    total.backward()


def test_soft_prompts_and_seq2seq_keep_the_plain_path(tiny_llama, tiny_t5):
    from deltatune.methods.prompt_learning import PromptOptions

    prompt = registry.get("prompt").apply(load_model(tiny_llama, "causal"), PromptOptions(num_virtual_tokens=3),
                                          tasks.get("causal_lm"))
    assert decoder_parts(prompt) is None
    assert decoder_parts(prompt.get_base_model()) is not None  # the untouched base of a soft prompt is fine
    batch = collate(examples(), pad_id=0)
    torch.manual_seed(0)
    a = forward_loss(prompt.eval(), batch["inputs"], batch["targets"], "causal_lm", chunked=True)
    b = forward_loss(prompt, batch["inputs"], batch["targets"], "causal_lm", chunked=False)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    t5 = load_model(tiny_t5, "seq2seq").eval()
    pairs = [{"input_ids": e["input_ids"], "labels": e["input_ids"][:4]} for e in examples()]
    batch = collate(pairs, pad_id=0)
    assert torch.equal(forward_loss(t5, batch["inputs"], batch["targets"], "seq2seq", chunked=True)[0],
                       forward_loss(t5, batch["inputs"], batch["targets"], "seq2seq", chunked=False)[0])


class ScaledLogits(LlamaForCausalLM):
    """A model that does more than project its hidden states (as soft-capping models do)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_model_that_transforms_its_logits_takes_the_plain_path(tiny_llama):
    model = ScaledLogits.from_pretrained(tiny_llama).train()
    with pytest.warns(UserWarning, match="does more to its logits"):
        assert decoder_parts(model) is None
    assert model.training and all(m.training for m in model.modules())  # the check restored the mode
    batch = collate(examples(), pad_id=0)
    assert torch.equal(forward_loss(model, batch["inputs"], batch["targets"], "causal_lm", chunked=True)[0],
                       forward_loss(model, batch["inputs"], batch["targets"], "causal_lm", chunked=False)[0])


def test_evaluation_gives_the_same_loss_chunked_or_not(llama_lora):
    data = examples(20)
    a = evaluate(llama_lora, data, "causal_lm", 8, 0, chunked_loss=True)
    b = evaluate(llama_lora, data, "causal_lm", 8, 0, chunked_loss=False)
    assert a["tokens"] == b["tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_chunked_loss_keeps_no_logits_for_backward(llama_lora):
    """What autograd holds on to between forward and backward: the plain loss keeps (batch x length x
    vocabulary) tensors, the chunked one nothing of vocabulary width (its chunks are recomputed)."""
    batch = collate(examples(8, longest=30), pad_id=0)
    body, head = decoder_parts(llama_lora)
    vocab = head.weight.shape[0]

    def saved_shapes(loss):
        shapes = []

        def keep(t):
            shapes.append(tuple(t.shape))
            return t

        hidden = body(**batch["inputs"]).last_hidden_state.detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss(hidden)
        return shapes

    from deltatune.losses import causal_lm_loss
    plain_shapes = saved_shapes(lambda h: causal_lm_loss(head(h), batch["targets"]))
    chunked_shapes = saved_shapes(lambda h: chunked_causal_lm_loss(h, head, batch["targets"], chunk_tokens=8))
    positions = batch["targets"][:, 1:].numel()
    assert any(s and s[-1] == vocab and torch.Size(s).numel() >= positions * vocab for s in plain_shapes)
    assert not any(s and s[-1] == vocab for s in chunked_shapes), chunked_shapes


def test_gradient_checkpointing_gives_the_same_loss_and_grads(tiny_llama, tiny_bert):
    batch = collate(examples(), pad_id=0)
    model = lora(load_model(tiny_llama, "causal"))
    for compute in (plain, chunked):
        reference = loss_and_grads(model, compute(model, batch))
        checkpointed = lora(load_model(tiny_llama, "causal"))
        enable_gradient_checkpointing(checkpointed)
        decoder_parts(checkpointed)  # its one-off check runs the layers too
        calls = count_layer_calls(checkpointed)
        assert_same(reference, loss_and_grads(checkpointed, compute(checkpointed, batch)))
        assert calls == [2, 2]  # each layer ran again in backward: checkpointing is really on

    rows = [{"input_ids": [2, *range(20, 20 + n), 3], "label": n % 2} for n in (3, 5, 8, 4)]
    batch = collate_labelled(rows, pad_id=0)
    labels = ["negative", "positive"]
    reference = loss_and_grads(*bert_case(tiny_bert, labels, batch, checkpointing=False))
    checkpointed, compute = bert_case(tiny_bert, labels, batch, checkpointing=True)
    calls = count_layer_calls(checkpointed)
    assert_same(reference, loss_and_grads(checkpointed, compute))
    assert calls == [2, 2]


def bert_case(path, labels, batch, checkpointing: bool):
    """LoRA on BERT, with dropout on: checkpointing replays the same masks."""
    torch.manual_seed(0)  # the same new classifier head
    model = lora(load_model(path, "sequence", labels, 0), "classification")
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model, plain(model, batch, "classification")


def count_layer_calls(model) -> list[int]:
    from deltatune.models import transformer_layers

    calls = [0] * len(transformer_layers(model))
    for i, layer in enumerate(transformer_layers(model)):  # a module inside: the layer's own hooks run once
        next(layer.children()).register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_gradient_checkpointing_is_ignored_where_no_layer_runs_in_training(tiny_bert, cls_csv):
    from deltatune.train.run import build_job
    from tests.helpers import config

    job, _, _ = build_job(config(tiny_bert, "classification", "feature_extraction", cls_csv), None)
    with pytest.warns(UserWarning, match="nothing to recompute"):
        enable_gradient_checkpointing(job.model)


@pytest.mark.parametrize("path", [plain, chunked], ids=["plain", "chunked"])
def test_bf16_autocast_is_close_to_fp32(llama_lora, path):
    batch = collate(examples(), pad_id=0)
    reference = loss_and_grads(llama_lora, path(llama_lora, batch))
    compute = path(llama_lora, batch)

    def under_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compute()

    loss, grads = loss_and_grads(llama_lora, under_autocast)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads.values())  # fp32 masters
    torch.testing.assert_close(loss, reference[0], rtol=2e-2, atol=0)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_auto_follows_the_measured_products(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 4.1)  # a Zen 4 EPYC
    assert bf16_enabled("auto", cpu)
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 0.5)  # an AVX512-BF16 Xeon without AMX
    assert not bf16_enabled("auto", cpu)
    monkeypatch.setenv(precision.ENV, "1")  # declared: no measurement
    assert bf16_enabled("auto", cpu)
    monkeypatch.setenv(precision.ENV, "0")
    monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda: 4.1)
    assert not bf16_enabled("auto", cpu)
    assert not bf16_enabled("auto", torch.device("mps"))
    assert bf16_enabled(True, cpu) and not bf16_enabled(False, cpu)


def test_bf16_speedup_is_measured_only_where_the_cpu_has_bf16_arithmetic(monkeypatch):
    precision.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx2", "fma"})
    assert precision.cpu_bf16_speedup() == 0.0
    precision.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    measured = precision.cpu_bf16_speedup()  # a real measurement, whatever this machine gives
    assert 0 < measured < 100
    precision.cpu_bf16_speedup.cache_clear()
    assert isinstance(precision._cpu_flags(), set)


def test_defaults_validate_and_values_are_checked(tiny_llama, qa_jsonl):
    base = [f"model={tiny_llama}", "task=causal_lm", f"data.train={qa_jsonl}"]
    t = load_config(None, base).train
    assert (t.chunked_loss, t.bf16, t.gradient_checkpointing) == (True, "auto", False)
    t = load_config(None, [*base, "train.bf16=true", "train.chunked_loss=false", "train.gradient_checkpointing=true"]).train
    assert (t.chunked_loss, t.bf16, t.gradient_checkpointing) == (False, True, True)
    assert load_config(None, [*base, "train.bf16=false"]).train.bf16 is False
    with pytest.raises(ConfigError, match="train.bf16: use auto, true or false, got 'fast'"):
        load_config(None, [*base, "train.bf16=fast"])


def test_training_runs_with_every_option_on(tiny_llama, qa_jsonl, tmp_path):
    """The loop end to end with all three options (and the run's config records them)."""
    from deltatune.train.run import train
    from tests.helpers import config

    cfg = config(tiny_llama, "causal_lm", "lora", qa_jsonl, tmp_path / "run", "train.max_steps=2",
                 "train.bf16=true", "train.gradient_checkpointing=true", "train.chunked_loss=true",
                 "eval.forgetting=false")
    run = train(cfg)
    assert (run.path / "metrics.json").is_file()
    assert "gradient_checkpointing: true" in run.config.read_text()


@pytest.mark.parametrize("answer", ["1", "0"])
def test_env_json_and_the_output_say_what_auto_decided(answer, tiny_llama, qa_jsonl, tmp_path, monkeypatch, capsys):
    import json

    from deltatune.train.run import train
    from tests.helpers import config

    from deltatune.train import progress

    monkeypatch.setenv(precision.ENV, answer)
    monkeypatch.setenv(progress.ENV, "plain")  # an earlier test's --quiet may have left it off
    cfg = config(tiny_llama, "causal_lm", "lora", qa_jsonl, tmp_path / "run", "train.max_steps=1", "eval.forgetting=false",
                 "train.progress=true")
    assert cfg.train.bf16 == "auto"
    run = train(cfg)
    assert json.loads((run.path / "env.json").read_text())["bf16"] is (answer == "1")
    assert ("bf16 autocast" in capsys.readouterr().err) is (answer == "1")


def test_fused_adamw_where_the_device_has_it_and_it_steps_like_the_default():
    torch.manual_seed(0)
    weights = [torch.randn(7, 5), torch.randn(5)]
    grads = [torch.randn_like(w) for w in weights]

    def trained(make) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}])
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    fused = loop.adamw([torch.nn.Parameter(w.clone()) for w in weights], lr=1e-2)
    assert fused.defaults["fused"] is True  # CPU tensors have torch's fused kernel
    for a, b in zip(trained(lambda g: loop.adamw(g, lr=1e-2)), trained(lambda g: torch.optim.AdamW(g, lr=1e-2))):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adamw_falls_back_where_there_is_no_fused_kernel(monkeypatch):
    monkeypatch.setattr(loop, "_fused_kernels_devices", lambda: ["cuda"])
    assert not loop.adamw([torch.nn.Parameter(torch.ones(2))], lr=1e-3).defaults["fused"]
