"""Outputs never destroy what deltatune did not write; failed writes (full disk, read-only, no permission)
are one line and leave nothing behind; damaged runs and bad arguments are clear errors, never tracebacks."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from deltatune import fs
from deltatune.cli import main
from deltatune.errors import DataError, OutputError, RunError
from deltatune.rundir import check_safetensors
from deltatune.train.run import train
from tests.helpers import config

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into a chmod 0o555 folder anyway


@pytest.fixture(scope="module")
def run(tiny_bert, tmp_path_factory) -> Path:
    """One small trained LoRA run, shared (tests that damage it work on a copy)."""
    folder = tmp_path_factory.mktemp("safe")
    data = folder / "sentiment.csv"
    from tests.conftest import sentiment_rows, write_csv

    write_csv(data, sentiment_rows(32))
    return train(config(tiny_bert, "classification", "lora", data, folder / "run", "train.epochs=1")).path


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings a write left behind (they start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- 1. export never deletes a user's folder

@pytest.mark.parametrize("merge", [False, True])
def test_export_refuses_a_folder_it_did_not_write(run, tmp_path, capsys, merge):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for force in ([], ["--force"]):
        code, err = cli(capsys, "export", run, *(["--merge"] if merge else []), "--out", out, *force)
        assert code == 2
        assert err.startswith(f"error: --out {out}: exists, is not empty and is not a deltatune export")
        assert "choose another --out" in err
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_export_force_replaces_only_a_previous_export_of_the_same_kind(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli(capsys, "export", run, "--out", out)[0] == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["kind"] == "delta" and manifest["run"] == str(run.resolve())
    assert {"adapter_model.safetensors", "config.yaml", "tokenizer/tokenizer.json"} <= set(manifest["files"])

    (out / "adapter_model.safetensors").write_bytes(b"old")  # to see it replaced
    code, err = cli(capsys, "export", run, "--out", out)
    assert code == 2 and f"--out {out}: already holds a delta export" in err and "pass --force" in err
    assert (out / "adapter_model.safetensors").read_bytes() == b"old"

    code, err = cli(capsys, "export", run, "--merge", "--out", out, "--force")
    assert code == 2 and "holds a delta export, not a merged one" in err

    (out / "mine.txt").write_text("keep me")
    code, err = cli(capsys, "export", run, "--out", out, "--force")
    assert code == 2 and "also holds files the export did not write (mine.txt)" in err
    assert (out / "mine.txt").read_text() == "keep me"
    (out / "mine.txt").unlink()

    assert cli(capsys, "export", run, "--out", out, "--force")[0] == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (run / "delta" / "adapter_model.safetensors").read_bytes()
    assert leftovers(tmp_path) == []


def test_export_into_an_empty_folder_and_the_default_path(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, "export", run, "--merge", "--out", empty)[0] == 0
    assert json.loads((empty / "export.json").read_text())["kind"] == "merged"
    assert (empty / "model.safetensors").is_file()
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert cli(capsys, "export", copy)[0] == 0 and (copy / "export" / "export.json").is_file()
    code, err = cli(capsys, "export", copy)
    assert code == 2 and "pass --force" in err
    assert cli(capsys, "export", copy, "--force")[0] == 0


def test_export_out_must_not_be_the_run_or_inside_what_it_reads(run, tmp_path, capsys):
    code, err = cli(capsys, "export", run, "--out", run)
    assert code == 2 and "is the run directory itself" in err
    code, err = cli(capsys, "export", run, "--out", run / "delta" / "x")
    assert code == 2 and "inside the run's delta/" in err
    assert not (run / "delta" / "x").exists()


def test_replace_dir_refuses_what_it_does_not_own_and_keeps_the_old_folder_on_failure(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")

    def build(tmp: Path) -> None:
        (tmp / "a").write_text("new")

    with pytest.raises(OutputError, match="exists and is not empty; deltatune never replaces a folder"):
        fs.replace_dir(final, build)

    def broken(tmp: Path) -> None:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash while building")

    with pytest.raises(RuntimeError):
        fs.replace_dir(final, broken, owned=True)
    assert (final / "a").read_text() == "old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", [1, 2, 3])  # new built -> .out.new; out -> .out.old; .out.new -> out
def test_replace_dir_undoes_a_swap_that_fails_part_way(tmp_path, monkeypatch, failing):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("old")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(fs.os, "replace", replace)
    with pytest.raises(OSError) as caught:
        fs.replace_dir(final, lambda tmp: (tmp / "a").write_text("new"), owned=True)
    monkeypatch.undo()
    assert caught.value.filename == str(final)
    assert (final / "a").read_text() == "old" and leftovers(tmp_path) == []


def test_replace_dir_fsyncs_the_new_folder_before_the_swap(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fs, "fsync_tree", lambda path: synced.append(sorted(p.name for p in Path(path).iterdir())))
    fs.replace_dir(tmp_path / "out", lambda tmp: (tmp / "a").write_text("new"))
    assert synced == [["a"]] and (tmp_path / "out" / "a").read_text() == "new" and leftovers(tmp_path) == []


def test_write_errors_name_the_file_not_its_temporary_name(tmp_path):
    hidden = tmp_path / ".export.partial-k2j_x9" / "model.safetensors"
    error = fs.with_path(OSError(errno.ENOSPC, "No space left on device", str(hidden)))
    assert error.filename == str(tmp_path / "export" / "model.safetensors") and error.errno == errno.ENOSPC
    error = fs.with_path(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / ".m.json.partial-ab")))
    assert isinstance(error, PermissionError) and error.filename == str(tmp_path / "m.json")
    assert fs.with_path(OSError(errno.ENOSPC, "full"), tmp_path / "x").filename == str(tmp_path / "x")
    copy = shutil.Error([("src", str(tmp_path / ".e.partial-abc" / "f"), "[Errno 28] No space left on device")])
    assert fs.with_path(copy).filename == str(tmp_path / "e" / "f")
    assert fs.with_path(ValueError("no I/O here")).args == ("no I/O here",)


def test_atomic_dir_still_replaces_its_own_folders(tmp_path):
    final = tmp_path / "best"
    fs.atomic_dir(final, lambda tmp: (tmp / "w").write_text("1"))
    fs.atomic_dir(final, lambda tmp: (tmp / "w").write_text("2"))
    assert [p.name for p in final.iterdir()] == ["w"] and (final / "w").read_text() == "2"
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- other outputs

def test_predict_output_file_needs_force_and_is_never_the_input(run, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    out.write_text("my notes\n")
    code, err = cli(capsys, "predict", run, "--text", "good film", "--output", out)
    assert code == 2 and f"--output {out}: exists; pass --force" in err and out.read_text() == "my notes\n"
    assert cli(capsys, "predict", run, "--text", "good film", "--output", out, "--force")[0] == 0
    assert json.loads(out.read_text())["text"] == "good film"
    texts = tmp_path / "texts.txt"
    texts.write_text("good film\n")
    code, err = cli(capsys, "predict", run, "--input", texts, "--output", texts, "--force")
    assert code == 2 and "is the --input file" in err and texts.read_text() == "good film\n"
    code, err = cli(capsys, "predict", run, "--text", "x", "--output", tmp_path)
    assert code == 2 and "is a folder" in err


def test_compare_and_tune_refuse_a_folder_with_foreign_files(tiny_bert, cls_csv, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "report.html").write_text("my report")
    (folder / "notes.txt").write_text("keep me")
    base = [f"model={tiny_bert}", f"data.train={cls_csv}"]
    code, err = cli(capsys, "compare", *base, "--methods", "lora", "--out", folder)
    assert code == 2 and f"--out {folder}: holds files that are not a deltatune comparison's (notes.txt)" in err
    code, err = cli(capsys, "tune", *base, f"output_dir={folder}", "--trials", "1")
    assert code == 2 and f"{folder}: holds files that are not a deltatune study's (notes.txt, report.html)" in err
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "report.html"]
    assert (folder / "report.html").read_text() == "my report"


def test_feedback_never_cuts_off_a_file_it_did_not_write(tmp_path):
    from rich.console import Console

    from deltatune.rlhf.feedback import read_log

    for text in ('{"prompt": "hi", "response": "a user row without a newline"}', "some notes"):
        out = tmp_path / "prefs.jsonl"
        out.write_text(text)
        with pytest.raises(DataError, match="its last line is not a row deltatune feedback wrote"):
            read_log(out, Console(quiet=True))
        assert out.read_text() == text


# ----------------------------------------------------------------------------- 2. disks: full, read-only, no permission

def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_atomic_write_text_on_a_full_disk_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    fs.atomic_write_text(path, "old")
    monkeypatch.setattr(fs.os, "fsync", enospc)  # where NFS and quotas report it
    with pytest.raises(OSError) as caught:
        fs.atomic_write_text(path, "new")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_atomic_write_text_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced, folders = [], []
    real = os.fsync
    monkeypatch.setattr(fs.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    monkeypatch.setattr(fs, "fsync_dir", lambda path: folders.append(Path(path)))
    fs.atomic_write_text(tmp_path / "f.txt", "x")
    assert len(synced) == 1 and folders == [tmp_path]
    monkeypatch.undo()
    fs.fsync_dir(tmp_path)  # really opens and syncs a folder


def test_full_disk_on_predict_output_is_one_line(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "predictions.jsonl"
    monkeypatch.setattr(fs.os, "fsync", enospc)
    code, err = cli(capsys, "predict", run, "--text", "good film", "--output", out)
    assert code == 2
    assert err == (f"error: cannot write {out}: No space left on device (disk full); free some space on that disk "
                   "or write somewhere else, then run the command again\n")
    assert not out.exists() and leftovers(tmp_path) == []


def test_full_disk_while_exporting_names_the_export(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    monkeypatch.setattr(os, "sendfile", enospc)  # shutil.copyfile copies with sendfile on Linux
    monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", True)
    code, err = cli(capsys, "export", run, "--out", out)
    assert code == 2 and err.startswith(f"error: cannot write {out}/") and "No space left on device (disk full)" in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_full_disk_inside_a_library_while_merging(run, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # how safetensors (Rust) reports it
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    out = tmp_path / "merged"
    code, err = cli(capsys, "export", run, "--merge", "--out", out)
    assert code == 2 and err.startswith(f"error: cannot write {out}: No space left on device (disk full); free some")
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("code,said", [(errno.EROFS, "Read-only file system; write to a writable disk"),
                                       (errno.EACCES, "Permission denied; make {folder} writable for you"),
                                       (errno.EDQUOT, "Disk quota exceeded; free some space within your quota")])
def test_read_only_or_forbidden_output_is_one_line(run, tmp_path, capsys, monkeypatch, code, said):
    """As root (tests here may run as root) chmod does not stop a write: the error is simulated."""
    import tempfile

    def refuse(*args, prefix="", dir=None, **kwargs):
        raise OSError(code, os.strerror(code), os.path.join(dir, prefix + "abc"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "out"
    exit_code, err = cli(capsys, "export", run, "--out", out)
    assert exit_code == 2 and err.startswith(f"error: cannot write {out}: {said.format(folder=tmp_path)}"), err
    exit_code, err = cli(capsys, "predict", run, "--text", "good film", "--output", out / "p.jsonl")
    assert exit_code == 2 and err.startswith(f"error: cannot write {out / 'p.jsonl'}: "), err


def test_write_errors_from_anywhere_are_one_line_and_bugs_still_raise(tmp_path, capsys, monkeypatch):
    import deltatune.cli as cli_module

    def raises(exc):
        def command(args):
            raise exc
        return command

    out = tmp_path / "out"
    monkeypatch.setitem(cli_module.COMMANDS, "export", raises(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    code, err = cli(capsys, "export", tmp_path / "run", "--out", out)  # write() names no file: the output is named
    assert code == 2 and err.startswith(f"error: cannot write {out}: No space left on device (disk full); ")
    rust = Exception('Error while serializing: I/O error: Read-only file system (os error 30) at path "/x/.tmpAbC"')
    monkeypatch.setitem(cli_module.COMMANDS, "export", raises(rust))
    code, err = cli(capsys, "export", tmp_path / "run", "--out", out)
    assert code == 2 and err.startswith("error: cannot write /x: Read-only file system; write to a writable disk")
    monkeypatch.setitem(cli_module.COMMANDS, "export", raises(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not an I/O error: not hidden behind a one-liner
        main(["export", str(tmp_path / "run")])


@pytest.mark.skipif(ROOT, reason="root writes into a read-only folder anyway (simulated above)")
def test_read_only_folder_for_real(run, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        code, err = cli(capsys, "export", run, "--out", folder / "x")
        assert code == 2 and err.startswith(f"error: cannot write {folder / 'x'}: Permission denied; make {folder} "
                                            "writable for you")
        code, err = cli(capsys, "predict", run, "--text", "hi", "--output", folder / "p.jsonl")
        assert code == 2 and "cannot write" in err
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# ----------------------------------------------------------------------------- 3. text arguments that are not UTF-8

def test_text_arguments_that_are_not_utf8(tmp_path, capsys):
    bad = b"\xff\xfe".decode("utf-8", "surrogateescape")  # what Python makes of $'\xff\xfe' in argv
    code, err = cli(capsys, "predict", tmp_path / "no-run", "--text", bad)
    assert code == 2
    assert err == ("error: --text is not valid UTF-8 (byte 0xff at byte 0); the shell passed bytes in another "
                   "encoding. Set the terminal to UTF-8, or put the texts in a UTF-8 file and pass --input FILE\n")
    latin1 = b"caf\xe9 film".decode("utf-8", "surrogateescape")
    code, err = cli(capsys, "predict", tmp_path / "no-run", "--text", "fine", "--text", latin1)
    assert code == 2 and "the 2nd --text is not valid UTF-8 (byte 0xe9 at byte 3, after 'caf')" in err
    code, err = cli(capsys, "train", "train.lr=1e-3", "data.text_column=t" + bad)
    assert code == 2 and "a key=value override is not valid UTF-8 (byte 0xff at byte 18" in err
    code, err = cli(capsys, "compare", "--methods", "lora," + bad)
    assert code == 2 and "--methods is not valid UTF-8" in err


# ----------------------------------------------------------------------------- 4. damaged runs

def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize("command", [["predict", "--text", "good film"], ["eval", "--data", "DATA"], ["export"],
                                     ["export", "--merge"]])
def test_truncated_delta_is_a_run_error(run, tmp_path, capsys, command):
    copy = _copy(run, tmp_path)
    weights = copy / "delta" / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    args = [a.replace("DATA", str(run.parent / "sentiment.csv")) for a in command[1:]]
    code, err = cli(capsys, command[0], copy, *args)
    assert code == 2
    assert err.startswith(f"error: {weights}: corrupted or truncated (the file has {len(whole) // 2:,} bytes, its "
                          f"header describes {len(whole):,}); restore {copy / 'delta'} from a good copy")
    assert "deltatune train" in err and "output_dir=NEW_DIR" in err
    assert not (copy / "export").exists() and not (copy / "merged").exists()


def test_missing_or_damaged_delta_files_are_run_errors(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    (copy / "delta" / "adapter_config.json").write_text('{"peft_type": ')
    code, err = cli(capsys, "predict", copy, "--text", "x")
    assert code == 2 and f"{copy / 'delta'}: the run's delta cannot be loaded (JSONDecodeError" in err
    (copy / "delta" / "adapter_config.json").unlink()
    code, err = cli(capsys, "predict", copy, "--text", "x")
    assert code == 2 and "Can't find 'adapter_config.json'" in err
    (copy / "delta" / "adapter_model.safetensors").unlink()
    code, err = cli(capsys, "predict", copy, "--text", "x")
    assert code == 2 and "no .safetensors weights file in the run's delta" in err
    shutil.rmtree(copy / "delta")
    for command in (["predict", copy, "--text", "x"], ["export", copy]):
        code, err = cli(capsys, *command)
        assert code == 2 and f"{copy / 'delta'}: the run's delta folder is missing" in err
    (copy / "metrics.json").write_text('{"eval": ')
    code, err = cli(capsys, "eval", copy)
    assert code == 2 and f"{copy / 'metrics.json'}: corrupted (" in err


def test_check_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(10.0)}, good)
    check_safetensors(good, "hint")
    whole = good.read_bytes()
    cases = {"short": whole[:5], "half": whole[: len(whole) // 2], "longer": whole + b"\0",
             "header": whole[:8] + b"x" * (len(whole) - 8), "huge": b"\xff" * 8 + whole[8:]}
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(RunError, match=rf"{name}.safetensors: corrupted.*; do this"):
            check_safetensors(bad, "do this")
    with pytest.raises(RunError, match="nope.safetensors: missing; do this"):
        check_safetensors(tmp_path / "nope.safetensors", "do this")


# ----------------------------------------------------------------------------- 5. plan's arguments

@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "-0.5"])
def test_plan_memory_must_be_a_positive_number(capsys, value):
    code, err = cli(capsys, "plan", "--memory-gb", value)
    assert code == 2
    assert err.startswith(f"error: --memory-gb {float(value):g}: must be a positive number of gigabytes")


def test_predict_max_new_tokens_must_be_positive(tmp_path, capsys):
    code, err = cli(capsys, "predict", tmp_path, "--text", "x", "--max-new-tokens", "-3")
    assert code == 2 and "--max-new-tokens -3: must be at least 1" in err
