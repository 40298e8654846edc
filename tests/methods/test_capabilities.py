"""What methods can do, as attributes: which tasks they train, their search spaces (no training)."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune import hpo
from deltatune.components import supports, tasks_of
from deltatune.methods import registry
from deltatune.tasks import registry as tasks
from tests.helpers import config

ALL_BUT_PPO = ["classification", "causal_lm", "token_classification", "seq2seq", "reward", "dpo", "orpo", "simpo",
               "kto"]
SAMPLING = ["ppo", "grpo"]  # tasks that sample their own data; their reference is the delta switched off
# The `tasks` tuples the methods declared before capabilities replaced them.
TASKS_BEFORE = {
    "full": ALL_BUT_PPO, "freeze": ALL_BUT_PPO, "bitfit": ALL_BUT_PPO, "houlsby": ALL_BUT_PPO,
    "feature_extraction": ["classification"],
    "lora": [*ALL_BUT_PPO, *SAMPLING], "qlora": [*ALL_BUT_PPO, *SAMPLING], "ia3": [*ALL_BUT_PPO, *SAMPLING],
    "prefix": ALL_BUT_PPO, "prompt": ALL_BUT_PPO, "ptuning": ALL_BUT_PPO,
    # Added later: peft's other delta methods. AdaLoRA's rank schedule runs on the one loop, which PPO does not use.
    "vera": [*ALL_BUT_PPO, *SAMPLING], "loha": [*ALL_BUT_PPO, *SAMPLING], "lokr": [*ALL_BUT_PPO, *SAMPLING],
    "oft": [*ALL_BUT_PPO, *SAMPLING], "adalora": ALL_BUT_PPO,
}
# hpo.DEFAULT_SPACE before each method declared its own search space.
DEFAULT_SPACE_BEFORE = {
    "train.lr": {"low": 1e-5, "high": 3e-3, "log": True},
    "train.weight_decay": [0.0, 0.01, 0.1],
    "train.warmup_ratio": [0.0, 0.06, 0.1],
    "lora.r": [4, 8, 16, 32], "lora.alpha": [8, 16, 32, 64], "lora.dropout": [0.0, 0.05, 0.1],
    "qlora.r": [4, 8, 16, 32], "qlora.alpha": [8, 16, 32, 64],
    "houlsby.reduction_factor": [8, 16, 32, 64],
    "prefix.num_virtual_tokens": [5, 10, 20], "prompt.num_virtual_tokens": [5, 10, 20],
    "ptuning.num_virtual_tokens": [5, 10, 20],
    "freeze.trainable_layers": {"low": 1, "high": 4},
}
# The search spaces of the methods added since.
NEW_SPACES = {
    "vera.r": [64, 256, 1024], "vera.d_initial": [0.01, 0.1, 1.0],
    "loha.r": [4, 8, 16], "loha.alpha": [4, 8, 16, 32], "lokr.r": [4, 8, 16], "lokr.alpha": [4, 8, 16, 32],
    "oft.block_size": [8, 16, 32, 64], "adalora.target_r": [2, 4, 8], "adalora.init_r": [12, 16],
}


@pytest.mark.parametrize("method", registry.names())
def test_supported_tasks_are_what_the_task_lists_said(method):
    assert set(registry.names()) == set(TASKS_BEFORE)  # a new method: add its row above
    impl = registry.get(method)
    for task in tasks.names():
        why = supports(impl, tasks.get(task))
        assert (why is None) == (task in TASKS_BEFORE[method]), (method, task, why)
        assert why is None or why.strip()  # a refusal says why
    assert sorted(tasks_of(impl)) == sorted(TASKS_BEFORE[method])


def test_capabilities_of_each_method():
    def having(attribute: str) -> set[str]:
        return {name for name in registry.names() if getattr(registry.get(name), attribute)}

    assert having("prepends_virtual_tokens") == {"prefix", "prompt", "ptuning"}
    assert having("quantized_base") == {"qlora"}
    assert having("caches_features") == {"feature_extraction"}
    assert having("traceable") == {"houlsby", "feature_extraction"}
    assert having("switchable_off") == {"lora", "qlora", "ia3", "prefix", "prompt", "ptuning",
                                        "vera", "loha", "lokr", "oft", "adalora"}


def test_refusals_name_the_reason_in_config_errors(tiny_llama, qa_jsonl):
    from deltatune.errors import ConfigError

    with pytest.raises(ConfigError, match="feature_extraction does not support task 'causal_lm': feature "
                                          r"extraction trains a classifier .*\(it supports: classification\)"):
        config(tiny_llama, "causal_lm", "feature_extraction", qa_jsonl)


def test_default_space_is_built_from_the_methods():
    assert hpo.default_space() == {**DEFAULT_SPACE_BEFORE, **NEW_SPACES}
    assert hpo.read_space(None) == {**DEFAULT_SPACE_BEFORE, **NEW_SPACES}


def test_default_objective_is_the_tasks_main_metric():
    for name in tasks.names():
        metric = tasks.get(name).main_metric
        assert hpo.parse_objectives(None, name) == [(metric.name, metric.direction)]
    assert hpo.parse_objectives("reward,margin", "ppo") == [("reward", "maximize"), ("margin", "maximize")]


SPACE_CHOICES = [(name, option, value) for name in registry.names()
                 for option, choice in registry.get(name).search_space().items()
                 for value in (choice if isinstance(choice, list) else [choice["low"], choice["high"]])]


@pytest.mark.parametrize("method,option,value", SPACE_CHOICES, ids=[f"{m}.{o}={v}" for m, o, v in SPACE_CHOICES])
def test_every_search_space_choice_is_a_valid_option(method, option, value, tiny_bert, cls_csv):
    impl = registry.get(method)
    assert option in {f.name for f in dataclasses.fields(impl.Options)}
    cfg = config(tiny_bert, tasks_of(impl)[0], method, cls_csv, None, f"method.{option}={value}")
    assert getattr(cfg.method.options, option) == value
