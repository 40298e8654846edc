import pytest

from deltatune.cli import main
from deltatune.config import dump_yaml, parse_overrides
from deltatune.configure import load_config
from deltatune.errors import ConfigError


def test_overrides_are_typed_and_nested():
    assert parse_overrides(["train.lr=1e-4", "method.r=16", "data.eval_limit=null", "method.target_modules=[q,v]"]) == {
        "train": {"lr": "1e-4"}, "method": {"r": 16, "target_modules": ["q", "v"]}, "data": {"eval_limit": None}}


def test_values_are_coerced(cls_csv, tiny_bert):
    cfg = load_config(None, [f"model={tiny_bert}", f"data.train={cls_csv}", "train.lr=1e-4", "method.r=4",
                             "method.target_modules=query,value"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.method.options.r == 4 and cfg.method.options.target_modules == ["query", "value"]


def test_every_problem_is_reported_at_once_with_did_you_mean(cls_csv, tiny_bert, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: {tiny_bert}\ntask: clasification\ndata: {{train: {cls_csv}}}\n"
                    "train: {lrr: 0.1, batch_size: -1, epochs: two}\nmethod: {name: lora, rank: 4}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "5 problem(s)" in message, message
    assert "task: unknown task 'clasification' (did you mean 'classification'?)" in message
    assert "train.lrr: unknown key (did you mean 'lr'?)" in message
    assert "train.epochs: expected a whole number, got 'two'" in message
    assert "train.batch_size: must be greater than 0, got -1" in message
    assert "method.rank: unknown key" in message
    assert str(path) in message


def test_method_options_belong_to_their_method(cls_csv, tiny_bert):
    with pytest.raises(ConfigError, match="method.r: unknown key"):
        load_config(None, [f"model={tiny_bert}", f"data.train={cls_csv}", "method.name=bitfit", "method.r=8"])
    cfg = load_config(None, [f"model={tiny_bert}", f"data.train={cls_csv}", "method.name=freeze",
                             "method.trainable_layers=1"])
    assert cfg.method.options.trainable_layers == 1


def test_method_must_support_task(qa_jsonl, tiny_llama):
    with pytest.raises(ConfigError, match="feature_extraction does not support task 'causal_lm'"):
        load_config(None, [f"model={tiny_llama}", "task=causal_lm", f"data.train={qa_jsonl}",
                           "method.name=feature_extraction"])


def test_resolved_config_round_trips(cls_csv, tiny_bert, tmp_path):
    cfg = load_config(None, [f"model={tiny_bert}", f"data.train={cls_csv}", "method.r=4", "train.seed=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


def test_validate_command(cls_csv, tiny_bert, capsys):
    assert main(["validate", f"model={tiny_bert}", f"data.train={cls_csv}"]) == 0
    assert "config is valid" in capsys.readouterr().err
    assert main(["validate", f"model={tiny_bert}", f"data.train={cls_csv}", "train.bogus=1"]) == 2
    assert "train.bogus: unknown key" in capsys.readouterr().err
    assert main(["validate", "--explain"]) == 0
    assert "train.grad_accum" in capsys.readouterr().out


def test_switching_method_drops_the_files_method_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: minilm\ndata: {train: pang-lee-sentences}\nmethod: {name: lora, r: 4}\n")
    assert load_config(path, ["method.name=bitfit"]).method.name == "bitfit"
    assert load_config(path, ["method.name=lora"]).method.options.r == 4
    assert load_config(path, ["method.r=2"]).method.options.r == 2
    path.write_text("model: minilm\ndata: {train: pang-lee-sentences}\nmethod: {r: 4}\n")  # lora by default
    assert load_config(path, ["method.name=lora"]).method.options.r == 4
    assert load_config(path, ["method.name=ia3"]).method.name == "ia3"
    with pytest.raises(ConfigError, match="method.r: unknown key"):  # options given with the switch still count
        load_config(path, ["method.name=bitfit", "method.r=2"])
