"""Every shipped config validates and trains one step on the real packaged model and data."""

import json
from pathlib import Path

import pytest

from deltatune.configure import load_config
from deltatune.train.run import train

# Training configs: configs/<model>/<task>-<method>.yaml. Not here: accelerate launcher files
# (tests/e2e/test_ddp.py) and tuning search spaces (tests/unit/test_hpo.py).
CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs").glob("*/*.yaml")
                 if p.parent.name not in ("accelerate", "spaces"))
ONE_STEP = ["train.max_steps=1", "train.batch_size=2", "train.eval_batch_size=8", "data.train_limit=8",
            "data.eval_limit=8", "train.max_length=48", "train.progress=false", "eval.forgetting_rows=8"]


def test_every_model_task_method_has_a_config():
    from deltatune.components import tasks_of
    from deltatune.methods import registry

    names = {p.relative_to(p.parents[1]).as_posix() for p in CONFIGS}
    for method in registry.names():
        supported = tasks_of(registry.get(method))
        if "classification" in supported:
            assert f"minilm/classification-{method}.yaml" in names
        if "causal_lm" in supported and method != "bitfit":  # SmolLM2 has no biases
            assert f"smollm2-135m/causal_lm-{method}.yaml" in names
        if "token_classification" in supported:
            assert f"minilm/token_classification-{method}.yaml" in names
    # seq2seq: no pretrained encoder-decoder installs offline; it is tested on a tiny random T5.


@pytest.mark.e2e
@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_shipped_config_trains_one_step(path, tmp_path):
    task = load_config(path).task
    if task == "ppo":
        pytest.skip("needs a trained reward model: tests/unit/test_ppo.py trains one and runs this config")
    if task == "grpo":  # ONE_STEP would still sample 4 groups and evaluate 8 prompts by generating: 80 s
        pytest.skip("tests/unit/test_grpo.py runs this config for one small iteration on SmolLM2")
    run = train(load_config(path, [*ONE_STEP, f"output_dir={tmp_path / 'run'}"]))
    metrics = json.loads((run.path / "metrics.json").read_text())
    fitted = "fit" in json.loads(run.log.read_text().splitlines()[0])  # a method that fits directly takes no step
    assert metrics["steps"] == (0 if fitted else 1)
    assert fitted == (load_config(path).method.name == "feature_extraction")
    assert metrics["trainable_params"] > 0
