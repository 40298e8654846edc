"""What a person trips over on the command line: packaged names wherever a path goes, `assets` saying where
things are, `eval --data` with other column names, `eval --pretty` with the per-class figures, and errors
that say where a bad value came from."""

import json

import pytest

from deltatune import assets
from deltatune.cli import main
from deltatune.configure import load_config
from deltatune.errors import ConfigError
from tests.helpers import QUICK


def test_assets_lists_licence_size_and_path_or_how_to_prepare(capsys):
    assert main(["assets"]) == 0
    out = capsys.readouterr().out
    for name, _, _, state in assets.status():
        block = out.split(f"\n{name} (", 1)[1].split("\n\n")[0]
        assert f"licence  {assets.LICENCES[name]}" in block
        found = assets.where(name)
        if state == "ready":
            assert f"path     {found[0]}" in block and found[0].exists() and " MB" in block
        else:
            assert found is None and "deltatune assets --install" in block


def test_a_packaged_name_works_where_a_data_file_goes(capsys, tmp_path):
    if assets.where("chatterbot") is None:
        pytest.skip("the chatterbot asset is not prepared (deltatune assets --install)")
    assert main(["data", "inspect", "chatterbot", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] > 2000 and {"prompt", "response"} <= set(summary["columns"])
    assert main(["data", "inspect", str(tmp_path / "missing.csv")]) == 2
    err = capsys.readouterr().err
    assert "file does not exist" in err and "chatterbot" in err and "in your config" not in err


@pytest.fixture
def tiny_run(tiny_bert, cls_csv, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", f"model={tiny_bert}", f"data.train={cls_csv}", *QUICK, "train.epochs=1", "method.name=lora",
                 f"output_dir={run}"]) == 0
    capsys.readouterr()
    return run


def test_eval_data_with_other_column_names(tiny_run, cls_csv, tmp_path, capsys):
    renamed = tmp_path / "renamed.csv"
    renamed.write_text(cls_csv.read_text().replace("text,label", "review,stars", 1))
    assert main(["eval", str(tiny_run), "--data", str(renamed)]) == 2
    err = capsys.readouterr().err
    # the advice names a setting this very command takes, and not the loader's internal columns
    assert "Set data.text_column=<column>" in err and "review, stars" in err and "_file" not in err
    assert main(["eval", str(tiny_run), "--data", str(renamed), "data.text_column=review",
                 "data.label_column=stars"]) == 0
    assert json.loads(capsys.readouterr().out)["eval"]["accuracy"] >= 0
    assert main(["eval", str(tiny_run), "--data", str(renamed), "train.lr=1"]) == 2
    assert "eval takes only the data file's columns" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "data.text_column=review"]) == 2
    assert "--data FILE only" in capsys.readouterr().err


def test_eval_pretty_shows_per_class_figures_and_the_confusion_matrix(tiny_run, capsys):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert main(["eval", str(tiny_run), "--pretty"]) == 0
    err = capsys.readouterr().err
    assert "per class" in err and "confusion matrix" in err and "true \\ predicted" in err
    for label, figures in metrics["eval"]["per_class"].items():
        assert label in err and f"{figures['f1']:.4f}" in err
    assert str(tiny_run) in err.splitlines()[0]  # the path on its own line, not broken into the title


def test_config_problems_say_which_came_from_the_command_line(tmp_path, tiny_bert, cls_csv):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {tiny_bert}\ndata: {{train: {cls_csv}}}\nmethod: {{name: lora, r: 0}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.lr=abc"])
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path}: 2 problem(s)")
    assert any(line.strip().startswith("- train.lr:") and line.endswith("(set on the command line)") for line in lines)
    assert any(line.strip().startswith("- method.r:") and "command line" not in line for line in lines)


def test_explain_names_every_packaged_data_set(capsys):
    assert main(["validate", "--explain"]) == 0
    explained = capsys.readouterr().out
    line = next(line for line in explained.splitlines() if line.startswith("data.train"))
    text = explained.split(line, 1)[1].split("\ndata.", 1)[0]
    for name in assets.DATASETS:
        assert name in text, name


def test_a_delta_names_its_base_portably_with_a_fingerprint(tiny_run, tiny_bert):
    adapter = json.loads((tiny_run / "delta" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == tiny_bert.name  # not this machine's path
    base = json.loads((tiny_run / "env.json").read_text())["base_model"]
    assert base["name"] == tiny_bert.name and base["sha256"] == assets.model_fingerprint(tiny_bert)
    assert len(base["sha256"]) == 64
    assert assets.portable_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
