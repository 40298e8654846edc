"""The New run page through the ASGI app (no browser): the form generated from the config dataclasses (every
section, every key, defaults and docs), the CLI's own messages at the fields, only changed fields as
overrides, CSRF, choices confined to the data root, the launched command and its config, cancel refused for
a run this studio did not start. tests/unit/test_studio_newrun_browser.py launches, cancels and resumes."""

from __future__ import annotations

import html

import pytest
import yaml

from deltatune.configure import load_config
from deltatune.errors import ConfigError
from deltatune.studio import launch as runs_here
from deltatune.studio import newrun_form as nf
from tests.studio_runs import write_run
from tests.unit.test_studio import client, csrf

BASE = {"model": "minilm", "task": "classification", "method.name": "lora", "data.train": "reviews.csv"}


def post(c, **fields):
    token = csrf(c.get("/new").text)
    return c.post("/new", data={"csrf_token": token, "action": "check", **BASE, **fields}, follow_redirects=False)


def test_the_form_has_every_section_key_default_and_doc(tmp_path):
    page = client(tmp_path).get("/new").text
    for legend in ("Model and task", "Method", "Data", "Training", "Evaluation and task settings"):
        assert f"<legend>{legend}</legend>" in page
    for f in nf.config_fields():
        assert f'name="{f.name}"' in page, f.key
        assert html.escape(f.help, quote=True) in page, f.key
    assert 'id="f-train-batch-size" name="train.batch_size"' in page and 'value="16"' in page
    assert '<option value="reviews.csv" selected>' in page  # the first file under the data root
    for key in nf.NOT_IN_FORM:
        assert f'name="{key}"' not in page  # paths and code are set in a YAML config, not in a form
    # every method's options are on the page; only the chosen one's are shown
    assert 'data-when="method.name" data-when-value="lora">' in page
    assert 'data-when="method.name" data-when-value="bitfit" hidden' in page
    assert 'name="m.houlsby.bottleneck"' in page and 'name="m.lora.r"' in page


def test_a_bad_value_shows_the_command_lines_message_at_its_field(tmp_path):
    c = client(tmp_path)
    response = post(c, **{"train.batch_size": "0", "m.lora.r": "0", "data.eval_fraction": "1.5"})
    assert response.status_code == 400
    with pytest.raises(ConfigError) as cli:
        load_config(None, [f"{k}={v}" for k, v in {**BASE, "data.train": str(tmp_path / "data" / "reviews.csv"),
                                                     "train.batch_size": 0, "method.r": 0,
                                                     "data.eval_fraction": 1.5}.items()])
    messages = [p.replace(nf.FROM_COMMAND_LINE, "") for p in cli.value.problems]
    assert len(messages) == 4  # eval_fraction's also makes test_fraction's sum wrong
    for message in messages:
        assert html.escape(message) in response.text  # word for word
    at_field = response.text.split('id="f-train-batch-size-error">')[1].split("</p>")[0]
    assert "train.batch_size: must be greater than 0, got 0" in at_field
    assert 'id="f-m-lora-r-error"' in response.text and 'aria-invalid=true' in response.text
    assert 'value="0"' in response.text  # what was typed stays in the form


def test_values_that_are_not_even_yaml_are_reported_with_the_rest(tmp_path):
    response = post(client(tmp_path), **{"train.lr": "[", "train.epochs": "-1"})
    assert response.status_code == 400
    assert "override &#x27;train.lr=[&#x27;: the value is not valid YAML" in response.text
    assert "train.epochs: must be greater than 0, got -1" in response.text


def test_check_gives_the_command_of_only_the_changed_fields(tmp_path, monkeypatch):
    monkeypatch.setattr(runs_here, "predict", lambda cfg: (_ for _ in ()).throw(ConfigError(["task: no plan here"])))
    response = post(client(tmp_path), **{"train.max_steps": "5", "train.batch_size": "16"})
    assert response.status_code == 200 and "Checked: ready to launch" in response.text
    assert "No prediction for this run: task: no plan here" in response.text
    data = tmp_path / "data" / "reviews.csv"
    assert (f"deltatune train model=minilm task=classification method.name=lora data.train={data} "
            "train.max_steps=5</code>") in response.text


def test_every_post_needs_its_csrf_token(tmp_path):
    c = client(tmp_path)
    c.get("/new")
    assert c.post("/new", data={**BASE, "action": "launch"}).status_code == 403
    assert c.post("/new", data={**BASE, "action": "launch", "csrf_token": "0" * 40}).status_code == 403
    assert c.post("/runs/0123abcd/cancel").status_code == 403
    assert not (tmp_path / "runs" / runs_here.CONFIGS).exists()


@pytest.mark.parametrize("key,value,status", [("data.train", "../outside.csv", 400), ("data.train", "/etc/passwd", 400),
                                              ("data.eval", "link/secret.csv", 403), ("model", "../../models", 400),
                                              ("model", "link", 403)])
def test_choices_stay_under_the_data_root(tmp_path, key, value, status):
    c = client(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.csv").write_text("text,label\nx,y\n")
    (tmp_path / "data" / "link").symlink_to(outside)
    response = post(c, **{key: value, "action": "launch"})
    assert response.status_code == status and "secret" not in response.text.replace(value, "")
    assert not (tmp_path / "runs" / runs_here.CONFIGS).exists()


def test_launch_writes_the_resolved_config_and_starts_train_on_it(tmp_path, monkeypatch):
    c = client(tmp_path)
    started = []

    def start(kind, argv, run_id=None):
        started.append((kind, argv))
        return type("Job", (), {"id": "0badcafe"})()

    c.app.state.jobs.start = start
    response = post(c, **{"action": "launch", "train.max_steps": "7", "m.lora.r": "4", "name": "first try"})
    assert response.status_code == 303 and response.headers["location"] == "/new/started/0badcafe"
    (kind, (command, config, output)), = started
    assert kind == "train" and command == "train" and output.startswith(f"output_dir={tmp_path / 'runs' / 'first-try-'}")
    assert config.startswith(str(tmp_path / "runs" / runs_here.CONFIGS))
    cfg = load_config(config)
    assert (cfg.train.max_steps, cfg.method.options.r, cfg.data.train) == (7, 4, str(tmp_path / "data" / "reviews.csv"))
    assert yaml.safe_load(open(config))["train"]["lr"] == 5e-4  # resolved: the method's default


def test_cancel_is_only_for_runs_this_studio_trains(tmp_path):
    run_id = write_run(tmp_path / "runs" / "terminal", "lora", status="running")
    c = client(tmp_path)
    assert c.get(f"/runs/{run_id}/cancel-form").text == ""
    token = csrf(c.get("/new").text)
    refused = c.post(f"/runs/{run_id}/cancel", data={"csrf_token": token})
    assert refused.status_code == 400 and "Ctrl-C" in refused.text
    assert c.get("/new/started/00000000").status_code == 404
