"""Every command README.md and docs/ show works as shown.

Commands are taken from inline code (`deltatune ...`) and from fenced blocks (continuation lines joined,
environment assignments, comments and a trailing `&` dropped). Three kinds:
- a synopsis (placeholders such as CONFIG or RUN_DIR, [optional] parts, a|b): every option it names must
  be one its command's --help lists;
- a mention (`deltatune compare`, `deltatune eval --data`: no positional argument): the command and the
  options it names must exist;
- a concrete command: it must parse exactly as written; the cheap ones (those that only read) run and
  must succeed. The rest train, serve or export on the real models: `make demo` and the e2e tests run them.
"""

import re
import shlex
from pathlib import Path

import pytest

from deltatune.cli import _parse, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CHEAP = {("validate",), ("methods",), ("tasks",), ("assets",), ("data", "inspect"), ("runs", "list")}
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]*\b|\[|\||\.\.\.|<")


def commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        found += [(doc.name, c) for c in re.findall(r"`(deltatune [^`]+)`", text)]
        for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^(\w+=\S+\s+)+", "", line.strip())  # OMP_NUM_THREADS=1 deltatune ...
                if line.startswith("deltatune "):
                    found.append((doc.name, re.sub(r"\s+&?\s*(#.*)?$", "", line.split("  #")[0]).strip()))
    return sorted(set(found))


def subcommand(words: list[str]) -> tuple[str, ...]:
    return tuple(words[:2]) if words[0] in ("data", "runs") and len(words) > 1 else (words[0],)


COMMANDS = commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 40, COMMANDS  # the extraction itself works


def _help(sub: tuple[str, ...], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse([*sub, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}: {c[:60]}" for d, c in COMMANDS])
def test_each_command_works_as_shown(doc, command, capsys, tmp_path, monkeypatch):
    words = command.split()[1:]
    sub = subcommand(words)
    help_text = _help(sub, capsys)  # the command exists
    for option in re.findall(r"(?<![\w-])--[a-z][a-z-]*", command):
        assert re.search(rf"(?<![\w-]){option}\b", help_text), f"{doc}: {command}: {option} is not an option"
    if PLACEHOLDER.search(command):
        return  # a synopsis
    argv = shlex.split(command)[1:]
    rest = argv[len(sub):]
    if not rest:  # `deltatune validate`: the command named in a sentence
        return
    mention = all(w.startswith("--") or (i and rest[i - 1].startswith("--")) for i, w in enumerate(rest))
    try:
        _parse(argv)  # exits (code 2) on anything argparse refuses
    except SystemExit:
        if not mention:  # a mention may leave out what the command requires
            raise
        return
    if sub in CHEAP and "--install" not in argv:
        monkeypatch.chdir(ROOT)  # README's paths are relative to the repository
        assert main(argv) == 0, capsys.readouterr().err
