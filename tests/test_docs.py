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


# ------------------------------------------------------------------------------ example outputs the docs show
# A fenced block preceded by `<!-- output of: COMMAND -->` is what COMMAND prints (stdout; progress bars aside).
OUTPUT = re.compile(r"<!-- output of: (.+?) -->[^\n]*\n```[^\n]*\n(.*?)^```", re.M | re.S)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def shown_output(doc: str, command: str) -> list[str]:
    """The lines of the block ``doc`` shows as the output of ``command``."""
    found = [block for cmd, block in OUTPUT.findall((ROOT / doc).read_text()) if cmd.strip() == command]
    assert len(found) == 1, f"{doc} shows no single output of `{command}` (marked <!-- output of: {command} -->)"
    return found[0].rstrip("\n").splitlines()


def shape(line: str) -> str:
    """A line with its numbers masked and its spacing collapsed: what stays when the model or the machine changes."""
    return " ".join(NUMBER.sub("#", line).split())


def answer_shapes(lines: list[str]) -> list[str]:
    """The quickstart's summary with the questions and answers masked (their text is the model's), their layout kept."""
    out = []
    for line in lines:
        if line.startswith(("    SFT:     ", "    aligned: ")):
            out.append(line[:13] + "ANSWER")
        elif line.startswith(" " * 13):
            out.append(" " * 13 + "ANSWER (continued)")
        elif line.startswith("  ") and not line.startswith("   "):
            out.append("  QUESTION")
        else:
            out.append(shape(line))
    return out


def test_every_example_output_is_marked_and_checked():
    marked = sorted((doc.name, cmd.strip()) for doc in DOCS for cmd, _ in OUTPUT.findall(doc.read_text()))
    assert ("README.md", "qsimpo quickstart") in marked and ("evaluate.md", "qsimpo eval adapters/quickstart/adapter "
                                                                          "--generate 10") in marked, marked


def test_the_readme_shows_what_the_quickstart_prints():
    """The README's quickstart output has the layout `qsimpo quickstart` prints: every line, the three examples,
    multi-line answers kept in their column. (The numbers and answers are the real run's: the real-model journey,
    tests/test_journey.py, compares them exactly.)"""
    import contextlib
    import io
    from pathlib import Path

    from qsimpo.quickstart.real import show

    shown = shown_output("README.md", "qsimpo quickstart")
    start = next(i for i, line in enumerate(shown) if line.startswith("held-out reward accuracy"))
    gens = [{"prompt": f"Question {i}?", "response": "An answer.\nIts second line." if i == 0 else "An answer."}
            for i in range(6)]
    probe = {"reward_accuracy": 0.2, "one_sentence_rate": 0.5, "mean_answer_words": 30, "generations": gens}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        show({"before": probe, "after": probe, "seconds": 90.0}, Path("adapters/quickstart"))
    printed = printed.getvalue().splitlines()
    assert printed[4].startswith(" " * 13) and printed[4].strip() == "Its second line."  # kept in its column
    mine = [s for s in answer_shapes(printed) if s and s != " " * 13 + "ANSWER (continued)"]
    theirs = [s for s in answer_shapes(shown[start:]) if s and s != " " * 13 + "ANSWER (continued)"]
    assert theirs == mine, "\n".join(shown[start:])
    assert shown[0].startswith("[1/4] SmolLM2-135M-Instruct (the SFT model): ") and shown[start - 1] == "[4/4] done"


def test_docs_evaluate_shows_what_eval_prints(quickstart_run, tmp_path, capsys):
    """docs/evaluate.md's example is eval's output line for line (numbers aside), checked on the tiny quickstart's
    adapter: every line it shows is one eval prints, and every line eval prints is shown (a length bucket the
    data lacks, such as "chosen is longer", may be missing from either)."""
    from qsimpo.cli import main

    out, _ = quickstart_run
    capsys.readouterr()
    assert main(["eval", str(out / "adapter"), "--generate", "10", "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out.replace(str(tmp_path / "eval"), "adapters/quickstart/adapter/eval")
    printed = printed.replace(str(out), "adapters/quickstart").splitlines()
    shown = shown_output("docs/evaluate.md", "qsimpo eval adapters/quickstart/adapter --generate 10")
    optional = re.compile(r"^(accuracy, chosen is|accuracy, same length|prefers the longer)")
    mine, theirs = [shape(x) for x in printed], [shape(x) for x in shown]
    assert [s for s in theirs if not optional.match(s)] == [s for s in mine if not optional.match(s)], "\n".join(printed)
    assert set(theirs) - set(mine) <= {s for s in theirs if optional.match(s)}


def test_docs_evaluate_shows_what_eval_of_two_adapters_prints(quickstart_run, tmp_path, capsys):
    """docs/evaluate.md's side-by-side example is what `qsimpo eval A B` prints, line for line (numbers aside), on the
    tiny quickstart's checkpoint-100 and final adapter."""
    from qsimpo.cli import main

    out, _ = quickstart_run
    capsys.readouterr()
    assert main(["eval", str(out / "adapter" / "checkpoint-100"), str(out / "adapter"), "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out.replace(str(tmp_path / "e"), "adapters/quickstart/adapter/eval-checkpoint-100-vs-adapter")
    printed = printed.replace(str(out), "adapters/quickstart").splitlines()
    shown = shown_output("docs/evaluate.md", "qsimpo eval adapters/quickstart/adapter/checkpoint-100 adapters/quickstart/adapter")
    optional = re.compile(r"^(accuracy, chosen is|accuracy, same length|prefers the longer)")
    mine, theirs = [shape(x) for x in printed], [shape(x) for x in shown]
    assert [s for s in theirs if not optional.match(s)] == [s for s in mine if not optional.match(s)], "\n".join(printed)
