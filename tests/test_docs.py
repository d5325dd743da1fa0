"""What README.md and docs/ name must exist: every module path and file, every command and every flag a doc
shows for it. A rename or a moved module fails here instead of leaving a stale sentence behind."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from functools import cache

import pytest

from conftest import ROOT

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
# qsimpo.a.b as a Python name; not a file name such as qsimpo.json, nor the tail of another path or name
MODULE = re.compile(r"(?<![\w./~$-])qsimpo(?:\.[A-Za-z_][A-Za-z_0-9]*)+")
FILES = re.compile(r"(?<![\w./~$-])(?:qsimpo|configs|benchmarks|tools|tests|docs)/[A-Za-z0-9_./-]*[A-Za-z0-9_/]")
COMMAND = re.compile(r"(?:^|\s)(?:python -m )?qsimpo ([a-z][a-z-]+)((?: [^\n]*)?)", re.M)  # within code
NOT_MODULES = {"qsimpo.json"}  # the file every run writes


def mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    """(doc name, text matched) for every match in every doc."""
    return sorted({(doc.name, m.group(0)) for doc in DOCS for m in pattern.finditer(doc.read_text())})


def resolve(dotted: str):
    """The module or attribute a dotted name means: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("doc,name", [m for m in mentions(MODULE) if m[1] not in NOT_MODULES])
def test_named_modules_exist(doc, name):
    try:
        resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{doc} names {name}, which does not exist ({e})")


@pytest.mark.parametrize("doc,path", mentions(FILES))
def test_named_files_exist(doc, path):
    assert (ROOT / path).exists(), f"{doc} names {path}, which is not in the repository"


@cache
def help_text(command: str | None) -> str:
    """What `qsimpo COMMAND --help` prints (`qsimpo --help` for None)."""
    args = [command, "--help"] if command else ["--help"]
    done = subprocess.run([sys.executable, "-m", "qsimpo", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"qsimpo {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}"
    return done.stdout


def shown_commands() -> dict[str, set[str]]:
    """Each command the docs show, with every --flag shown beside it."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        text = doc.read_text()
        # a usage block's continuation lines (indented, starting with a flag) belong to the command above
        fenced = [re.sub(r"\n[ \t]+(?=\[?--)", " ", block) for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)]
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S))
        for m in COMMAND.finditer("\n".join(fenced + inline)):
            command, rest = m.group(1), m.group(2)
            flags = found.setdefault(command, set())
            flags.update(re.findall(r"(?<![\w-])--[a-z](?:[a-z0-9_.-]*[a-z0-9])?", rest))
    return found


def test_every_command_the_docs_show_has_help_and_the_flags_shown():
    commands = shown_commands()
    listed = re.findall(r"^  (\S+) ", help_text(None), re.M)
    assert {"quickstart", "train", "inspect-data", "plan", "eval", "demo", "merge", "push"} <= set(commands)
    stale = []
    for command, flags in sorted(commands.items()):
        assert command in listed, f"the docs show `qsimpo {command}`, which is not a command ({', '.join(listed)})"
        for flag in sorted(flags):
            # --section.key is a config field (train, plan and inspect-data take them all; train --help lists them)
            text = help_text("train" if "." in flag else command)
            if not re.search(rf"{re.escape(flag)}(?![\w.-])", text):
                stale.append(f"qsimpo {command} {flag}")
    assert not stale, "the docs show flags the commands do not take:\n  " + "\n  ".join(stale)


def test_defaults_the_docs_give_are_the_schema_defaults():
    """`section.key` (default X) and `section.key: X` (default) in prose say what the schema says."""
    import dataclasses

    from qsimpo.config import Config

    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    config = Config()
    claims = []
    for doc in DOCS:
        text = doc.read_text()
        claims += [(doc.name, key, value) for key, value in re.findall(r"`(\w+\.\w+)` \(default ([^)]+?)[):,]", text)]
        claims += [(doc.name, key, value) for key, value in re.findall(r"`(\w+\.\w+): ([^`]+)` \(default\)", text)]
    assert len(claims) >= 3, claims
    words = {"on": True, "off": False, "true": True, "false": False, "null": None}
    for doc, key, value in claims:
        section, field = key.split(".")
        assert section in sections, f"{doc}: `{key}`: no config section {section!r}"
        default = getattr(getattr(config, section), field)
        first = value.split()[0]
        assert words.get(first, first) == default or first == str(default), f"{doc} gives {key} the default {value!r}; the schema's is {default!r}"
