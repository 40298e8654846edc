"""LoRA's variants on tiny models: DoRA, rsLoRA, the gaussian, PiSSA and OLoRA starts, LoRA+.

Each is refused with the key when misconfigured, counted, trained, merged, saved in peft's format and
reloaded, by peft itself and by deltatune, onto an untouched base with the trained model's outputs.
"""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError
from deltatune.eval.evaluate import forward
from deltatune.inference import load_run
from deltatune.methods import registry
from deltatune.methods.lora import LoraOptions
from deltatune.models import load_model
from deltatune.rundir import RunDir
from deltatune.tasks import registry as tasks
from deltatune.train.loop import param_groups, run_loop, schedule
from deltatune.train.run import build_job, resume, train
from tests.helpers import config

VARIANTS = {
    "dora": ["method.use_dora=true"],
    "rslora": ["method.use_rslora=true"],
    "gaussian": ["method.init=gaussian"],
    "pissa": ["method.init=pissa"],
    "olora": ["method.init=olora"],
    "pissa-dora-rslora": ["method.init=pissa", "method.use_dora=true", "method.use_rslora=true"],
}
HEADS = ("classifier.", "score.")  # the new head: trained and saved in full
MODELS = {"bert": ("classification", "cls_csv", "sequence"), "llama": ("causal_lm", "qa_jsonl", "causal")}


def _job(kind: str, request, *extra: str):
    task, data, _ = MODELS[kind]
    cfg = config(request.getfixturevalue(f"tiny_{kind}"), task, "lora", request.getfixturevalue(data), None,
                 "train.max_steps=4", "train.lr=3e-2", "train.warmup_ratio=0", *extra)
    job, prepared, tokenizer = build_job(cfg, None)
    return cfg, job, prepared, tokenizer


def _fresh(kind: str, request, prepared, tokenizer):
    return load_model(request.getfixturevalue(f"tiny_{kind}"), MODELS[kind][2], prepared.labels,
                      tokenizer.pad_token_id)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_variant_merges_and_reloads_onto_the_untouched_base(variant, kind, request, tmp_path):
    cfg, job, prepared, tokenizer = _job(kind, request, *VARIANTS[variant])
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    model, impl, task = job.model, registry.get("lora"), MODELS[kind][0]
    batch = job.task.collate(job.eval_examples[:8])
    with torch.no_grad():
        start = forward(model.eval(), batch["inputs"], batch["targets"], task)
    run_loop(job)
    impl.save_delta(model, tmp_path / "delta", cfg.method.options)
    with torch.no_grad():
        want = forward(model.eval(), batch["inputs"], batch["targets"], task)
        assert (want - start).abs().max() > 1e-2  # it trained: the parity below is not the start's with itself
        fresh = _fresh(kind, request, prepared, tokenizer)
        untouched = {k: v.clone() for k, v in fresh.state_dict().items() if not k.startswith(HEADS)}
        by_peft = peft.PeftModel.from_pretrained(fresh, tmp_path / "delta")
        ours = impl.load_delta(_fresh(kind, request, prepared, tokenizer), tmp_path / "delta", cfg.method.options,
                               tasks.get(task))
        for reloaded in (by_peft, ours):
            torch.testing.assert_close(forward(reloaded.eval(), batch["inputs"], batch["targets"], task), want,
                                       rtol=0, atol=1e-4)
        # A plain LoRA adapter on the base as it was: loading it changed no base weight (after PiSSA or OLoRA
        # as saved by peft, loading would decompose the base again), so other deltas can share that base.
        saved = json.loads((tmp_path / "delta" / "adapter_config.json").read_text())
        assert saved["init_lora_weights"] in (True, "gaussian")
        unloaded = by_peft.unload().state_dict()
        assert all(torch.equal(unloaded[k], v) for k, v in untouched.items())
        merged = impl.merge(model).eval()
        assert not any(k in n for n, _ in merged.named_parameters() for k in ("lora_", "base_layer"))
        torch.testing.assert_close(forward(merged, batch["inputs"], batch["targets"], task), want, rtol=0, atol=1e-4)


def test_trainable_counts_and_scales(tiny_bert, cls_csv):
    hidden, layers, labels, r, alpha = 32, 2, 2, 4, 16.0
    plain = layers * 2 * r * (hidden + hidden) + hidden * labels + labels  # query and value, and the head
    for extra, n in [([], plain), (["method.use_dora=true"], plain + layers * 2 * hidden),  # a magnitude per row
                     (["method.use_rslora=true"], plain), (["method.init=pissa"], plain),
                     (["method.init=olora"], plain), (["method.init=gaussian"], plain)]:
        job, _, _ = build_job(config(tiny_bert, "classification", "lora", cls_csv, None, f"method.r={r}", *extra),
                              None)
        assert sum(p.numel() for p in job.model.parameters() if p.requires_grad) == n, extra
        query = job.model.base_model.model.bert.encoder.layer[0].attention.self.query
        scale = alpha / math.sqrt(r) if "method.use_rslora=true" in extra else alpha / r
        assert query.scaling["default"] == scale


def test_pissa_and_olora_start_from_the_base_and_convert_as_peft_does(tiny_llama, qa_jsonl, request, tmp_path):
    """The model is the base at the start (the residual plus B0 A0); the saved adapter is what peft's own
    conversion writes (peft keeps only A and B, so the comparison is on a model without a new head)."""
    for init in ("pissa", "olora"):
        cfg, job, prepared, tokenizer = _job("llama", request, f"method.init={init}")
        job.run = RunDir(tmp_path / init)
        job.run.path.mkdir()
        batch = job.task.collate(job.eval_examples[:8])["inputs"]
        model = job.model
        with torch.no_grad():
            base = _fresh("llama", request, prepared, tokenizer).eval()(**batch).logits
            torch.testing.assert_close(model.eval()(**batch).logits, base, rtol=0, atol=1e-4)
        start = tmp_path / init / "start"
        model.peft_config["default"].init_lora_weights = True  # peft's recipe: save the start as plain LoRA
        model.save_pretrained(start)
        model.peft_config["default"].init_lora_weights = init
        run_loop(job)
        registry.get("lora").save_delta(model, tmp_path / init / "ours", cfg.method.options)
        model.save_pretrained(tmp_path / init / "peft", path_initial_model_for_weight_conversion=str(start))
        ours, theirs = (load_file(tmp_path / init / d / "adapter_model.safetensors") for d in ("ours", "peft"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), key
        configs = [json.loads((tmp_path / init / d / "adapter_config.json").read_text()) for d in ("ours", "peft")]
        for key in ("r", "lora_alpha", "init_lora_weights"):
            assert configs[0][key] == configs[1][key], key


@pytest.mark.parametrize("kind,init", [("bert", "pissa"), ("llama", "olora")])
def test_a_run_with_a_changed_base_loads_back_with_its_metrics(kind, init, request, tmp_path):
    """End to end: train, then inference.load_run (a fresh, untouched base plus the delta) scores the
    evaluation split as the trained model did."""
    task, data, _ = MODELS[kind]
    cfg = config(request.getfixturevalue(f"tiny_{kind}"), task, "lora", request.getfixturevalue(data),
                 tmp_path / "run", "train.max_steps=4", "train.lr=3e-2", f"method.init={init}")
    run = train(cfg)
    trained = json.loads((run.path / "metrics.json").read_text())["eval"]
    loaded = load_run(run.path)
    job, _, _ = build_job(cfg, None)  # the same split
    again = loaded.task.evaluate(loaded.model, job.eval_examples)
    assert again["loss"] == pytest.approx(trained["loss"], abs=1e-5)


BAD = [("method.init=loftq", "method.init: loftq fits B A to the error of a 4-bit quantized base, and lora's base "
                             "is not quantized: use method.name=qlora"),
       ("method.init=pissa_niter_4", "method.init: use default, gaussian, pissa, olora, eva, loftq, got 'pissa_niter_4'"),
       ("method.loraplus_lr_ratio=0", "method.loraplus_lr_ratio: must be a positive number"),
       ("method.loraplus_lr_ratio=-16", "method.loraplus_lr_ratio: must be a positive number")]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_options_are_refused_with_the_key(override, message, tiny_bert, cls_csv):
    with pytest.raises(ConfigError, match=message):
        config(tiny_bert, "classification", "lora", cls_csv, None, override)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_combinations_that_cannot_work_are_refused_by_name(init, tiny_llama, qa_jsonl):
    with pytest.raises(ConfigError, match=f"method.init: {init} cannot be used with qlora"):
        config(tiny_llama, "causal_lm", "qlora", qa_jsonl, None, f"method.init={init}")
    ppo = tasks.get("ppo")
    with pytest.raises(ConfigError, match=f"method.init: {init} changes the base weights.*ppo's reference"):
        registry.get("lora").apply(load_model(tiny_llama, "causal"), LoraOptions(init=init), ppo)
    with pytest.raises(ConfigError, match="method.loraplus_lr_ratio: ppo trains in its own loop"):
        registry.get("lora").apply(load_model(tiny_llama, "causal"), LoraOptions(loraplus_lr_ratio=16), ppo)


def test_loraplus_groups_equal_peft_and_the_schedule_scales_each(tiny_llama, qa_jsonl, request):
    """On a model whose only trainable tensors are A and B (peft's LoRA+ also speeds up every 1-D tensor and
    gives embedding adapters a fixed 1e-6; deltatune scales B alone), the rates match peft's optimizer."""
    from peft.optimizers import create_loraplus_optimizer

    cfg, job, _, _ = _job("llama", request, "method.loraplus_lr_ratio=16")
    lr, options = 1e-3, cfg.method.options
    ours = torch.optim.AdamW(param_groups(job.model, job.method, options, lr, 0.0), lr=lr)
    theirs = create_loraplus_optimizer(job.model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16)
    rates = [{id(p): g["lr"] for g in opt.param_groups for p in g["params"]} for opt in (ours, theirs)]
    assert rates[0] == rates[1]
    names = {id(p): n for n, p in job.model.named_parameters()}
    assert {names[i] for i, rate in rates[0].items() if rate == 16 * lr} == \
        {n for n, p in job.model.named_parameters() if p.requires_grad and ".lora_B." in n}
    scheduler = torch.optim.lr_scheduler.LambdaLR(ours, schedule(2, 10))
    for step in range(5):
        factor = schedule(2, 10)(step)
        assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["initial_lr"] * factor
                                                                      for g in ours.param_groups])
        ours.step()
        scheduler.step()


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_loraplus_moves_b_at_the_scaled_rate(ratio, tiny_bert, cls_csv, tmp_path):
    """AdamW's first step moves each weight by lr * g / (|g| + eps), about lr: B by train.lr x ratio, the new
    head by train.lr, and A not at all (B = 0 at the start gives A no gradient)."""
    lr = 1e-3
    extra = [f"method.loraplus_lr_ratio={ratio}"] if ratio else []
    cfg = config(tiny_bert, "classification", "lora", cls_csv, None, "train.max_steps=1", f"train.lr={lr}",
                 "train.warmup_ratio=0", "train.weight_decay=0", *extra)
    job, _, _ = build_job(cfg, None)
    job.run = RunDir(tmp_path)
    before = {n: p.detach().clone() for n, p in job.model.named_parameters() if p.requires_grad}
    run_loop(job)
    moved = {n: (p.detach() - before[n]).abs() for n, p in job.model.named_parameters() if p.requires_grad}

    def step_of(part: str) -> torch.Tensor:
        return torch.cat([m.flatten() for n, m in moved.items() if part in n])

    for part, rate in ((".lora_B.", lr * (ratio or 1)), ("classifier.", lr)):
        steps = step_of(part)
        assert (steps > 0).float().mean() > 0.9
        assert steps.median().item() == pytest.approx(rate, rel=1e-3)
        assert steps.max().item() <= rate * (1 + 1e-5)
    assert step_of(".lora_A.").max() == 0


COMMON = ["train.epochs=2", "train.grad_accum=2", "train.save_every=2", "train.lr=2e-3"]


@pytest.mark.parametrize("options", [["method.init=pissa", "method.use_dora=true", "method.loraplus_lr_ratio=16"],
                                     ["method.init=olora", "method.use_rslora=true"]], ids=["pissa", "olora"])
def test_interrupted_and_resumed_run_equals_uninterrupted(options, tiny_bert, cls_csv, tmp_path):
    def logged(run):
        return [json.loads(line) for line in (run.path / "log.jsonl").read_text().splitlines()]

    straight = train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "a", *COMMON, *options))

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_bert, "classification", "lora", cls_csv, tmp_path / "b", *COMMON, *options),
              callbacks=(interrupt,))
    resumed = resume(tmp_path / "b")
    a, b = (load_file(run.delta / "adapter_model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = [[(r["step"], r["loss"]) for r in logged(run) if "loss" in r] for run in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_qlora_with_dora_merges_exactly_and_reloads(tiny_llama64, qa_jsonl, tmp_path):
    cfg = config(tiny_llama64, "causal_lm", "qlora", qa_jsonl, None, "train.max_steps=3", "train.lr=1e-2",
                 "method.target_modules=[q_proj,v_proj]", "method.use_dora=true")
    job, _, _ = build_job(cfg, None)
    job.run = RunDir(tmp_path / "run")
    job.run.path.mkdir()
    run_loop(job)
    impl, model = registry.get("qlora"), job.model.eval()
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    impl.save_delta(model, tmp_path / "delta", cfg.method.options)
    batch = job.task.collate(job.eval_examples[:8])["inputs"]
    with torch.no_grad():
        expected = model(**batch).logits
        base = load_model(tiny_llama64, "causal", **impl.load_kwargs(cfg.method.options))
        reloaded = impl.load_delta(base, tmp_path / "delta", cfg.method.options, tasks.get("causal_lm")).eval()
        assert torch.equal(reloaded(**batch).logits, expected)
        merged = impl.merge(model).eval()
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)
