"""GRPO (task: grpo) on a tiny random Llama through `deltatune train`: a learnable reward rises on held-out
prompts, the run is deterministic, weighted reward sources add up, the built-in rewards and the arithmetic
data set do what they say, and bad configs or data fail before a run directory exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deltatune.cli import main
from deltatune.data import arithmetic as arithmetic_data
from deltatune.errors import ConfigError, DataError, DeltatuneError
from deltatune.rlhf.rewards import arithmetic, format_reward, last_number, load_sources
from deltatune.train.grpo import train_grpo
from tests.conftest import make_tiny_llama, sentiment_rows, write_jsonl
from tests.helpers import QUICK, config

ROOT = Path(__file__).resolve().parents[2]
ALL_LINEAR = "method.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
GOOD = "grpo.rewards=[{function: format, pattern: good}]"  # the tiny vocabulary has the word; 1 in ~10 samples
REWARD_PY = """\
def answer_is_mentioned(prompts, responses, answer):
    return [float(str(a) in r.split()) for r, a in zip(responses, answer)]

def everything(prompts, responses, **columns):
    assert set(columns) == {"prompt", "answer", "topic"}, columns
    return [float(len(columns["topic"][i])) for i in range(len(responses))]
"""


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster (conftest)


@pytest.fixture(scope="module")
def peaky_llama(tmp_path_factory):
    """conftest's tiny Llama with its (tied) embeddings scaled 4x, so its next-token distributions are not
    flat and a LoRA update moves them visibly (as in tests/unit/test_ppo.py)."""
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
def sums_jsonl(tmp_path_factory):
    """Sums in the tiny vocabulary ("what is 3 4", answer 7), with one more column."""
    rows = [{"prompt": f"what is {a} {b}", "answer": a + b, "topic": "sum"} for a in range(10) for b in range(10)]
    return write_jsonl(tmp_path_factory.mktemp("sums") / "sums.jsonl", rows)


@pytest.fixture(scope="module")
def reward_py(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "my_rewards.py"
    path.write_text(REWARD_PY)
    return path


def overrides(model, data, out, *extra) -> list[str]:
    return [f"model={model}", "task=grpo", "method.name=lora", f"data.train={data}", *QUICK, f"output_dir={out}",
            "data.chat_template=false", "grpo.max_new_tokens=8", "method.dropout=0", *extra]


def grpo_config(model, data, out=None, *extra):
    return config(model, "grpo", "lora", data, out, "data.chat_template=false", "grpo.max_new_tokens=8", *extra)


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- (a) acceptance, through the CLI

def test_grpo_raises_a_format_reward_on_held_out_prompts(peaky_llama, prompts_jsonl, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from deltatune import registry_db
    from deltatune.inference import load_run, predict

    out = tmp_path / "run"
    assert main(["train", *overrides(peaky_llama, prompts_jsonl, out, GOOD, ALL_LINEAR, "train.max_steps=30",
                                     "train.lr=1e-2")]) == 0
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert log[0]["kl"] == 0.0  # the first completions come from the untouched policy (LoRA B = 0)
    assert all(set(r) >= {"reward", "reward_std", "reward/format", "frac_reward_zero_std", "kl", "loss",
                          "clip_fraction", "entropy", "response_length", "seconds"} for r in log)
    first, last = sum(r["reward"] for r in log[:5]) / 5, sum(r["reward"] for r in log[-10:]) / 10
    assert last > first + 0.3, (first, last)  # measured: 0.11 -> 0.59

    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["baseline"], metrics["eval"]
    assert before["kl"] == 0.0 and 0 < after["kl"] < 2.0  # measured: 0.35 nats per token
    assert after["reward"] > before["reward"] + 0.4, (before, after)  # measured: 0.09 -> 0.75, same draws
    assert after["reward/format"] == after["reward"] and before["prompts"] == after["prompts"] == 16
    assert after["completions"] == 16 * 4 and metrics["completions"] == 30 * 16
    assert metrics["main_metric"] == {"name": "reward", "maximize": True}
    assert metrics["steps"] == 30 and metrics["trainable_params"] > 0
    assert metrics["reward_gain"] == pytest.approx(after["reward"] - before["reward"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(len(s["before"]) == len(s["reward_after"]) == 4 for s in samples)
    assert sum(map(sum, (s["reward_after"] for s in samples))) / 64 == pytest.approx(after["reward"], abs=1e-3)
    assert registry_db.get(str(out))["status"] == "completed"

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(peaky_llama), out / "delta")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in tuned.named_parameters())
    assert predict(load_run(out), ["the movie was"], max_new_tokens=4)[0]["new_tokens"] >= 1


def test_same_seed_same_run(peaky_llama, prompts_jsonl, tmp_path):
    from safetensors.torch import load_file

    def run(name: str, seed: int) -> tuple[list[dict], dict, dict]:
        out = tmp_path / name
        assert main(["train", *overrides(peaky_llama, prompts_jsonl, out, GOOD, "train.max_steps=4", "train.lr=1e-2",
                                         f"train.seed={seed}", "grpo.minibatch=6", "grpo.epochs_per_batch=2")]) == 0
        log = [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(out)]
        return log, json.loads((out / "metrics.json").read_text())["eval"], load_file(out / "delta" /
                                                                                       "adapter_model.safetensors")

    log_a, eval_a, delta_a = run("a", 7)
    log_b, eval_b, delta_b = run("b", 7)
    assert log_a == log_b and eval_a == eval_b
    assert delta_a.keys() == delta_b.keys() and all(torch.equal(delta_a[k], delta_b[k]) for k in delta_a)
    assert any(r["clip_fraction"] > 0 for r in log_a)  # later minibatches are off-policy: clipping happens
    log_c, _, _ = run("c", 8)
    assert log_c != log_a


# ----------------------------------------------------------------------------- (b) rewards

def test_weighted_sources_add_up_and_read_row_columns(peaky_llama, sums_jsonl, reward_py, tmp_path):
    rewards = ("grpo.rewards=[{function: arithmetic, weight: 2}, {function: format, pattern: '[0-9]', weight: 0.5}, "
               f"{{function: '{reward_py}:answer_is_mentioned', weight: -1}}, "
               f"{{function: '{reward_py}:everything', weight: 0.25}}]")
    out = tmp_path / "run"
    assert main(["train", *overrides(peaky_llama, sums_jsonl, out, rewards, "train.max_steps=3",
                                     "data.eval_limit=8")]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for figures in [*read_log(out), metrics["baseline"], metrics["eval"]]:
        parts = {k: figures[f"reward/{k}"] for k in ("arithmetic", "format", "answer_is_mentioned", "everything")}
        assert parts["everything"] == 3.0  # len("sum"): every column reached the **kwargs function
        assert figures["reward"] == pytest.approx(2 * parts["arithmetic"] + 0.5 * parts["format"]
                                                  - parts["answer_is_mentioned"] + 0.75, abs=1e-5)
    saved = (out / "config.yaml").read_text()
    assert f"{reward_py.resolve()}:everything" in saved  # the file as an absolute path: the config works anywhere


def test_last_number_and_the_arithmetic_reward():
    assert last_number("7 + 5 = 12.") == 12.0 and last_number("it is -3") == -3.0
    assert last_number("1,024 or 2.5") == 2.5 and last_number("no digits") is None
    assert last_number("between 1,024 and 2,048") == 2048.0
    scores = arithmetic(["q"] * 5, ["7 + 5 = 12", "12 is wrong, 13", "twelve", "12.0", "-4"], [12, 12, 12, "12", -4])
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0]


def test_format_reward_searches_the_pattern():
    reward = format_reward(r"^\d+$")
    assert reward(["q"] * 3, ["42", "the answer is 42", ""]) == [1.0, 0.0, 0.0]
    assert format_reward("good")(["q"] * 2, ["a good film", "bad"]) == [1.0, 0.0]


def test_sources_pass_the_columns_their_functions_name(peaky_llama, sums_jsonl, reward_py):
    cfg = grpo_config(peaky_llama, sums_jsonl, None,
                      f"grpo.rewards=[{{function: arithmetic}}, {{function: '{reward_py}:everything'}}, "
                      "{function: format, pattern: x}, {function: format, pattern: y}]")
    sources = load_sources(cfg)
    assert [(s.name, s.columns, s.numbers) for s in sources] == [
        ("arithmetic", ("answer",), ("answer",)), ("everything", None, ()), ("format", (), ()), ("format'", (), ())]
    rows = [{"prompt": "what is 1 2", "answer": 3, "topic": "sum", "_row": 1}]
    torch.testing.assert_close(sources[0](["what is 1 2"], ["3"], rows), torch.tensor([1.0]))
    torch.testing.assert_close(sources[1](["what is 1 2"], ["3"], rows), torch.tensor([3.0]))
    with pytest.raises(DataError, match=r"s.jsonl: row 4 has no value in column 'answer', which "
                                        r"grpo.rewards\[0\] \(arithmetic\) reads"):
        sources[0].check_rows([rows[0], {"prompt": "q", "_row": 4, "_file": "s.jsonl"}])
    with pytest.raises(DataError, match="row 5 has 'seven', not a number, in column 'answer'"):
        sources[0].check_rows([{"prompt": "q", "answer": "seven", "_row": 5}])


# ----------------------------------------------------------------------------- (c) the arithmetic data set

def test_the_shipped_arithmetic_file_is_the_generators_output():
    rows = arithmetic_data.problems()
    shipped = [json.loads(line) for line in (ROOT / "examples/arithmetic.jsonl").read_text().splitlines()]
    assert shipped == rows and len(rows) == 400
    assert len({r["prompt"] for r in rows}) == 400
    for row in rows:  # each answer is right
        _, a, op, b = row["prompt"].rstrip("?").rsplit(" ", 3)
        assert row["answer"] == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert arithmetic_data.problems(20, seed=1) == arithmetic_data.problems(20, seed=1) != arithmetic_data.problems(20)
    with pytest.raises(ValueError, match="882 distinct problems"):
        arithmetic_data.problems(1000)


# ----------------------------------------------------------------------------- (d) bad configs, bad data

BAD = {
    "no rewards": ([], ConfigError, r"grpo.rewards: no reward given"),
    "function and run": (["grpo.rewards=[{function: arithmetic, run: somewhere}]"], ConfigError,
                         r"grpo.rewards\[0\]: give exactly one of function: NAME or run: RUN_DIR \(both are set\)"),
    "unknown built-in": (["grpo.rewards=[{function: arithmetik}]"], ConfigError,
                         r"grpo.rewards\[0\].function: 'arithmetik' is neither a built-in reward "
                         r"\(arithmetic, format\)"),
    "unknown key": (["grpo.rewards=[{function: arithmetic, wieght: 2}]"], ConfigError,
                    r"grpo.rewards\[0\].wieght: unknown key \(did you mean 'weight'\?\)"),
    "format without pattern": (["grpo.rewards=[{function: format}]"], ConfigError,
                               r"grpo.rewards\[0\].pattern: the format reward needs the regex"),
    "bad regex": (["grpo.rewards=[{function: format, pattern: '(unclosed'}]"], ConfigError,
                  r"grpo.rewards\[0\].pattern: '\(unclosed' is not a valid regular expression"),
    "bad weight": (["grpo.rewards=[{function: arithmetic, weight: heavy}]"], ConfigError,
                   r"grpo.rewards\[0\].weight: expected a finite number, got 'heavy'"),
    "label on a function": (["grpo.rewards=[{function: arithmetic, label: positive}]"], ConfigError,
                            r"grpo.rewards\[0\].label: only a classifier run reads a label"),
    "not a run": (["grpo.rewards=[{run: '{tmp}'}]"], ConfigError, r"grpo.rewards\[0\].run: .* run is missing"),
    "missing function": (["grpo.rewards=[{function: '{fn}:nope'}]"], ConfigError,
                         r"grpo.rewards\[0\].function: .*my_rewards.py has no 'nope'"),
    "bad grpo values": ([GOOD, "grpo.group_size=1", "grpo.minibatch=99", "grpo.aggregate=sum", "grpo.clip=0"],
                        ConfigError, r"grpo.group_size: must be at least 2, got 1(.|\n)*grpo.minibatch: 99 is more "
                                     r"than the 1 completions(.|\n)*grpo.clip: must be greater than 0(.|\n)*"
                                     r"grpo.aggregate: 'sum' is not one of sequence, token"),
    "full fine-tuning": ([GOOD, "method.name=full"], ConfigError, "full does not support task 'grpo'"),
    "soft prompt": ([GOOD, "method.name=prompt"], ConfigError, "prompt does not support task 'grpo'"),
    "pissa moves the base": ([GOOD, "method.init=pissa"], ConfigError,
                             "with its delta switched off, the model is not the starting policy"),
    "no answer column": (["grpo.rewards=[{function: arithmetic}]"], DataError,
                         r"prompts.jsonl: row \d+ has no value in column 'answer', which grpo.rewards\[0\] "
                         r"\(arithmetic\) reads"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_fails_clearly_before_a_run_dir(case, peaky_llama, prompts_jsonl, reward_py, tmp_path):
    extra, error, message = BAD[case]
    extra = [e.replace("{fn}", str(reward_py)).replace("{tmp}", str(tmp_path)) for e in extra]
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        train_grpo(grpo_config(peaky_llama, prompts_jsonl, out, "grpo.prompts_per_step=1", *extra))
    assert not out.exists()


def test_a_failing_reward_function_fails_before_a_run_dir(peaky_llama, prompts_jsonl, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def reward(prompts, responses):\n    return [1.0]\n")
    out = tmp_path / "run"
    with pytest.raises(DeltatuneError, match=r"grpo.rewards\[0\]: returned 1 values for \d+ responses"):
        train_grpo(grpo_config(peaky_llama, prompts_jsonl, out, f"grpo.rewards=[{{function: '{broken}:reward'}}]"))
    assert not out.exists()


# ----------------------------------------------------------------------------- (e) the shipped config

def test_shipped_grpo_config_validates(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # its data path is relative to the repository
    assert main(["validate", "configs/smollm2-135m/grpo-lora.yaml"]) == 0, capsys.readouterr().err


@pytest.mark.e2e
def test_shipped_grpo_config_runs_on_smollm2(tmp_path, monkeypatch):
    """configs/smollm2-135m/grpo-lora.yaml, one small iteration on the real model and the arithmetic file."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    assert main(["train", "configs/smollm2-135m/grpo-lora.yaml", "train.max_steps=1", "grpo.prompts_per_step=1",
                 "grpo.max_new_tokens=8", "data.eval_limit=2", "train.progress=false", f"output_dir={out}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["eval"]["completions"] == 2 * 4
    assert {"reward/arithmetic", "reward/format"} <= set(metrics["eval"])
