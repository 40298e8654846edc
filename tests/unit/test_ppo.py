"""PPO (task: ppo) on tiny random models: the policy learns a toy reward within a bounded KL, the
reference is the base model without a second copy, rollouts are scored and masked correctly,
every reward source loads and scores, and bad configs fail before a run directory exists."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from deltatune.errors import ConfigError, DataError, DeltatuneError
from deltatune.train.ppo import VALUE_HEAD_FILE, build, prompt_rows, train_ppo
from deltatune.rlhf.rewards import load_reward, log_odds
from deltatune.rlhf.rollout import Rollout, encode_prompts, response_mask, sample, score_tokens, token_logprobs
from tests.conftest import make_tiny_llama, sentiment_rows, write_jsonl
from tests.helpers import config

ALL_LINEAR = "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
REWARD_PY = """\
def reward(prompts, responses):
    # the toy reward: the share of the response's words that are 'good'
    return [r.split().count('good') / max(len(r.split()), 1) for r in responses]

def wrong_length(prompts, responses):
    return [1.0]

NOT_A_FUNCTION = 3
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (conftest)


@pytest.fixture(scope="module")
def peaky_llama(tmp_path_factory):
    """conftest's tiny Llama with its (tied) embeddings scaled 4x: its next-token distributions are
    no longer flat (entropy 4.0 instead of ln 70 = 4.25), so a LoRA update moves them visibly."""
    from transformers import LlamaForCausalLM

    path = make_tiny_llama(tmp_path_factory.mktemp("peaky-llama"))
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_jsonl(tmp_path_factory):
    rows = [{"prompt": " ".join(r["text"].split()[:3])} for r in sentiment_rows(80)]
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", rows)


@pytest.fixture(scope="module")
def reward_py(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "toy_reward.py"
    path.write_text(REWARD_PY)
    return path


@pytest.fixture(scope="module")
def classifier_run(tiny_bert, tmp_path_factory):
    from deltatune.train.run import train

    folder = tmp_path_factory.mktemp("classifier")
    data = write_jsonl(folder / "sentiment.jsonl", sentiment_rows(48))
    return train(config(tiny_bert, "classification", "lora", data, folder / "run", "train.max_steps=1")).path


def ppo_config(model, data, out=None, *extra):
    return config(model, "ppo", "lora", data, out, "data.chat_template=false", "ppo.max_new_tokens=8", *extra)


# ----------------------------------------------------------------------------- (a) acceptance

def test_ppo_raises_the_toy_reward_with_bounded_kl(peaky_llama, prompts_jsonl, reward_py, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from deltatune import registry_db

    cfg = ppo_config(peaky_llama, prompts_jsonl, tmp_path / "run", f"ppo.reward_fn={reward_py}:reward",
                     ALL_LINEAR, "method.dropout=0", "train.max_steps=30", "train.lr=1e-2")
    run = train_ppo(cfg)
    log = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = [r["reward"] for r in log[:5]], [r["reward"] for r in log[-10:]]
    start, end = sum(first) / 5, sum(last) / 10
    assert end > 2.5 * start and end - start > 0.04, (first, last)  # measured: 0.03 -> 0.11
    assert log[0]["kl"] == 0.0  # the first rollouts come from the untouched policy (LoRA B = 0)
    assert max(r["kl"] for r in log) < 6.0  # measured peak: 3.4 nats per response
    assert all(set(r) >= {"reward", "kl", "kl_coef", "clip_fraction", "entropy", "value_loss", "policy_loss",
                          "approx_kl", "response_length", "seconds"} for r in log)

    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["baseline"]["kl"] == 0.0 and metrics["eval"]["kl"] < 6.0
    assert metrics["eval"]["reward"] > metrics["baseline"]["reward"] + 0.05  # held-out prompts, same draws
    assert metrics["steps"] == 30 and metrics["trainable_params"] > 0 and metrics["peak_rss_mb"] > 0
    samples = [json.loads(line) for line in (run.path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["eval"]["prompts"] == json.loads((run.path / "data.json").read_text())["eval_rows"]
    assert json.loads((run.path / "status.json").read_text())["status"] == "completed"
    assert registry_db.get(str(run.path))["status"] == "completed"

    # the delta is a peft adapter folder plus the value head
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaky_llama), run.delta)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())
    assert set(load_file(run.delta / VALUE_HEAD_FILE)) == {"weight", "bias"}


def test_predict_generates_with_a_ppo_run(peaky_llama, prompts_jsonl, reward_py, tmp_path):
    from deltatune.inference import load_run, predict

    run = train_ppo(ppo_config(peaky_llama, prompts_jsonl, tmp_path / "run", f"ppo.reward_fn={reward_py}:reward",
                               "train.max_steps=1", "ppo.rollout_batch=4"))
    out = predict(load_run(run.path), ["the movie was"], max_new_tokens=4)
    assert out[0]["new_tokens"] >= 1


# ----------------------------------------------------------------------------- (b) reference and scoring

def test_reference_is_the_base_model_and_no_copy_exists(peaky_llama, prompts_jsonl, reward_py):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    setup = build(ppo_config(peaky_llama, prompts_jsonl, None, f"ppo.reward_fn={reward_py}:reward"))
    gc.collect()
    assert sum(type(o) is LlamaForCausalLM for o in gc.get_objects()) == 1  # the policy's, nothing else
    policy = setup.policy
    with torch.no_grad():  # a trained-looking delta, so policy and reference differ
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    rollout = sample(policy, ["the movie", "good", "the film was very"], setup.cfg.ppo, False, 64)
    score_tokens(policy, rollout, temperature=0.7, chunk=2)

    base = AutoModelForCausalLM.from_pretrained(peaky_llama).eval()
    for i in range(len(rollout)):  # each row alone, unpadded, through an independent copy of the base
        ids = torch.cat([rollout.query[i][rollout.query_mask[i].bool()], rollout.response[i]])[None]
        n = rollout.response.shape[1]
        with torch.no_grad():
            expected = token_logprobs(base(input_ids=ids).logits[:, -n - 1:-1] / 0.7, rollout.response[i][None])[0]
        keep = rollout.mask[i].bool()
        torch.testing.assert_close(rollout.ref_logprobs[i][keep], expected[keep], atol=1e-5, rtol=0)
        assert not torch.allclose(rollout.logprobs[i][keep], expected[keep], atol=1e-3)


def test_rollout_logprobs_are_those_of_the_sampling_distribution(peaky_llama, prompts_jsonl, reward_py):
    """Left padding and position ids: re-scoring a sampled batch reproduces generate()'s own scores."""
    from transformers import GenerationConfig

    setup = build(ppo_config(peaky_llama, prompts_jsonl, None, f"ppo.reward_fn={reward_py}:reward"))
    policy, tok = setup.policy, setup.policy.tokenizer
    query, query_mask = encode_prompts(tok, ["the movie", "good", "the film was very bad"], False, 64)
    assert (query_mask[:, 0] == torch.tensor([0, 0, 1])).all() and query_mask[:, -1].all()  # left-padded
    torch.manual_seed(0)
    out = policy.model.generate(input_ids=query, attention_mask=query_mask, output_scores=True,
                                return_dict_in_generate=True,
                                generation_config=GenerationConfig(do_sample=True, temperature=0.7, top_k=0,
                                                                   max_new_tokens=6, eos_token_id=[-1],
                                                                   pad_token_id=tok.pad_token_id))
    response = out.sequences[:, query.shape[1]:]
    expected = token_logprobs(torch.stack(out.scores, 1), response)
    mask = torch.ones_like(response)
    rollout = Rollout(["a"] * 3, ["a"] * 3, query, query_mask, response, mask)
    score_tokens(policy, rollout, temperature=0.7, chunk=3)
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- (c) response mask

def test_response_mask_stops_after_the_first_eos():
    response = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0], [5, 2, 2, 2], [5, 9, 3, 9]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    assert torch.equal(response_mask(response, [2, 9]), expected)  # two EOS ids; pad = EOS in row 4


def test_sampled_rollouts_end_at_eos(peaky_llama, prompts_jsonl, reward_py):
    setup = build(ppo_config(peaky_llama, prompts_jsonl, None, f"ppo.reward_fn={reward_py}:reward",
                             "ppo.max_new_tokens=40"))
    tok = setup.policy.tokenizer
    torch.manual_seed(0)
    rollout = sample(setup.policy, setup.prompts("train")[:32], setup.cfg.ppo, False, 64)
    is_eos = rollout.response == tok.eos_token_id
    ended = is_eos.any(-1)
    assert 0 < ended.sum() < len(rollout)  # some responses end early, some run to max_new_tokens
    for row, mask, eos, text in zip(rollout.response, rollout.mask, is_eos, rollout.responses):
        length = int(eos.int().argmax()) + 1 if eos.any() else row.numel()
        assert mask[:length].all() and not mask[length:].any()
        assert text == tok.decode(row[:length], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- (d) reward sources

def test_reward_fn_from_a_file_and_from_a_module(peaky_llama, prompts_jsonl, reward_py, monkeypatch):
    prompts, responses = ["a", "b", "c"], ["good good bad", "", "the good film is good"]
    from_file = load_reward(ppo_config(peaky_llama, prompts_jsonl, None, f"ppo.reward_fn={reward_py}:reward"))
    torch.testing.assert_close(from_file(prompts, responses), torch.tensor([2 / 3, 0.0, 2 / 5]))
    monkeypatch.syspath_prepend(str(reward_py.parent))
    from_module = load_reward(ppo_config(peaky_llama, prompts_jsonl, None, "ppo.reward_fn=toy_reward:reward"))
    torch.testing.assert_close(from_module(prompts, responses), torch.tensor([2 / 3, 0.0, 2 / 5]))


def test_log_odds_by_hand():
    # row 1: z = [1, 2, 0], label 1: 2 - log(e + 1) = 2 - 1.313262; row 2: two classes, z1 - z0 = -3
    close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b), atol=1e-5, rtol=0)  # noqa: E731
    close(log_odds(torch.tensor([[1.0, 2.0, 0.0]]), 1), [0.686738])
    close(log_odds(torch.tensor([[2.0, -1.0]]), 1), [-3.0])


def test_classifier_run_reward_is_the_label_log_odds(classifier_run, peaky_llama, prompts_jsonl):
    from deltatune.inference import load_run, predict as classify

    reward = load_reward(ppo_config(peaky_llama, prompts_jsonl, None, f"ppo.reward_model={classifier_run}",
                                    "ppo.reward_label=positive"))
    prompts, responses = ["the film was", "this movie is"], ["good great excellent", "bad awful boring"]
    scores = reward(prompts, responses)
    probs = classify(load_run(classifier_run), [f"{p} {r}" for p, r in zip(prompts, responses)])
    expected = [math.log(x["probabilities"]["positive"] / x["probabilities"]["negative"]) for x in probs]
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=0)


def test_prompts_come_through_the_data_pipeline_with_templates(peaky_llama, tmp_path, reward_py):
    data = write_jsonl(tmp_path / "reviews.jsonl", sentiment_rows(40))
    cfg = ppo_config(peaky_llama, data, None, f"ppo.reward_fn={reward_py}:reward",
                     "data.templates={prompt: \"{{ text.split()[:3] | join(' ') }}\"}")
    rows = prompt_rows(cfg)
    assert rows.splits["eval"] and all(len(r["prompt"].split()) == 3 for r in rows.splits["train"])
    assert {r["prompt"] for r in rows.splits["train"]} <= {" ".join(r["text"].split()[:3]) for r in sentiment_rows(40)}
    with pytest.raises(DataError, match=r"no column 'prompt' \(set by data.prompt_column\)"):
        prompt_rows(ppo_config(peaky_llama, data, None, f"ppo.reward_fn={reward_py}:reward"))


# ----------------------------------------------------------------------------- (e) bad configs

BAD = {
    "both sources": (["ppo.reward_fn={fn}:reward", "ppo.reward_model={clf}"], ConfigError,
                     r"give exactly one reward source \(both are set\)"),
    "no source": ([], ConfigError, r"give exactly one reward source \(neither is set\)"),
    "unknown label": (["ppo.reward_model={clf}", "ppo.reward_label=neutral"], ConfigError,
                      "ppo.reward_label: .* 'neutral' is not one of its labels. Choose one of: negative, positive"),
    "no label": (["ppo.reward_model={clf}"], ConfigError, "ppo.reward_label is not set"),
    "label with a function": (["ppo.reward_fn={fn}:reward", "ppo.reward_label=positive"], ConfigError,
                              "ppo.reward_label: only used with a classifier"),
    "not a run": (["ppo.reward_model={tmp}"], ConfigError, "ppo.reward_model: .* run is missing"),
    "no colon": (["ppo.reward_fn={fn}"], ConfigError, "is not of the form 'module:function'"),
    "missing file": (["ppo.reward_fn={tmp}/nope.py:reward"], ConfigError,
                     "ppo.reward_fn: file .*nope.py does not exist"),
    "missing function": (["ppo.reward_fn={fn}:rewrd"], ConfigError,
                         r"has no 'rewrd' \(its functions: reward, wrong_length\)"),
    "not callable": (["ppo.reward_fn={fn}:NOT_A_FUNCTION"], ConfigError, "is not a function but a value of type int"),
    "missing module": (["ppo.reward_fn=no_such_module_xyz:reward"], ConfigError, "cannot import 'no_such_module_xyz'"),
    "wrong result": (["ppo.reward_fn={fn}:wrong_length"], DeltatuneError,
                     "ppo.reward_fn: returned 1 values for 16 responses"),
    "bad ppo values": (["ppo.reward_fn={fn}:reward", "ppo.rollout_batch=1", "ppo.temperature=0"], ConfigError,
                       "ppo.rollout_batch: must be at least 2, got 1(.|\n)*ppo.temperature: must be greater than 0"),
    "full fine-tuning": (["ppo.reward_fn={fn}:reward", "method.name=full"], ConfigError,
                         "full does not support task 'ppo'"),
    "soft prompt": (["ppo.reward_fn={fn}:reward", "method.name=prompt"], ConfigError,
                    "prompt does not support task 'ppo'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_clearly_before_a_run_dir(case, peaky_llama, prompts_jsonl, reward_py, classifier_run,
                                                   tmp_path):
    overrides, error, message = BAD[case]
    overrides = [o.format(fn=reward_py, clf=classifier_run, tmp=tmp_path) for o in overrides]
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train_ppo(ppo_config(peaky_llama, prompts_jsonl, out, *overrides, "data.eval_limit=16"))
    assert not out.exists()


# ----------------------------------------------------------------------------- the shipped config

@pytest.mark.e2e
def test_shipped_ppo_config_runs_on_smollm2_with_a_minilm_reward(tmp_path):
    """configs/smollm2-135m/ppo-lora.yaml, one small iteration, rewarded by a one-step MiniLM classifier run."""
    from pathlib import Path

    from deltatune.configure import load_config
    from deltatune.train.run import train

    configs = Path(__file__).parents[2] / "configs"
    clf = train(load_config(configs / "minilm/classification-lora.yaml",
                            ["train.max_steps=1", "train.batch_size=2", "data.train_limit=8", "data.eval_limit=8",
                             "train.progress=false", f"output_dir={tmp_path / 'clf'}"]))
    run = train(load_config(configs / "smollm2-135m/ppo-lora.yaml",
                            [f"ppo.reward_model={clf.path}", "train.max_steps=1", "ppo.rollout_batch=2",
                             "ppo.minibatch=2", "ppo.max_new_tokens=4", "data.train_limit=8", "data.eval_limit=2",
                             "train.progress=false", f"output_dir={tmp_path / 'ppo'}"]))
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["eval"]["prompts"] == 2
    assert all(len(r["prompt"].split()) == 8 for r in map(json.loads, (run.path / "samples.jsonl").open()))
