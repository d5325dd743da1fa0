"""The command grammar: every parser is built from its function's signature, read from source; help and docs/cli.md
come from the same table; old spellings keep working or name the new one; outputs are checked before any work."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qsimpo import cli
from qsimpo.cli_docs import markdown
from qsimpo.grammar import EMPTY, UNREAD, Command, Opt, load, signature

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


TARGETS = sorted({t for c in cli.COMMANDS.values() for t in c.targets})


@pytest.mark.parametrize("target", TARGETS)
def test_the_signature_read_from_source_is_the_function_s(target):
    """What the parser is built from (ast, no import) equals inspect.signature of the imported function."""
    read = signature(target)
    real = inspect.signature(load(target)).parameters
    assert list(read) == list(real)
    for name, p in real.items():
        default = EMPTY if p.default is inspect.Parameter.empty else p.default
        assert read[name].default is UNREAD or read[name].default == default, name


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_is_a_parameter_and_help_shows_its_default(name, capsys):
    command = cli.COMMANDS[name]
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for opt in command.options:
        param = command.param(opt)  # an option naming no parameter fails here
        if param.default not in (EMPTY, None, True, False, ()) and not opt.positional:
            assert f"(default: {param.default})" in text, opt.param


def target(adapter: str, out: str | None = None, batch_size: int = 8, verify: bool = True, datasets: list[str] = ()):
    return dict(adapter=adapter, out=out, batch_size=batch_size, verify=verify, datasets=list(datasets))


def test_options_left_out_are_not_passed_and_types_come_from_the_signature():
    c = Command("x", "x", "x", (f"{__name__}:target",),
                [Opt("adapter", "a", positional=True), Opt("out", "o"), Opt("batch_size", "b"),
                 Opt("verify", "v", flag="--no-verify"), Opt("datasets", "d", flag="--dataset", old=("--data-set",))])
    given, settings = c.parse(["a"])
    assert given == {"adapter": "a"} and settings == {"adapter": "a", "out": None, "batch_size": 8, "verify": True,
                                                      "datasets": ()}
    given, _ = c.parse(["a", "--batch-size", "2", "--no-verify", "--dataset", "x", "--data-set", "y"])
    assert c.call(given, {}) == dict(adapter="a", out=None, batch_size=2, verify=False, datasets=["x", "y"])
    with pytest.raises(Exception, match="invalid int value: 'two'"):
        c.parse(["a", "--batch-size", "two"])


def test_usage_lists_every_command_and_the_exit_codes(capsys):
    code, out, _ = run([], capsys)
    assert code == 0 and all(name in out for name in cli.COMMANDS) and "130 interrupted" in out
    code, _, err = run(["trian"], capsys)
    assert code == 2 and "unknown command 'trian'" in err


def test_docs_cli_md_is_generated_from_the_command_table():
    assert (ROOT / "docs" / "cli.md").read_text() == markdown(), "regenerate: python -m qsimpo.cli_docs > docs/cli.md"


# -------------------------------------------------------------------------------- old spellings
def test_old_spellings_keep_working_or_name_the_new_one(tmp_path, capsys):
    parsed = cli.COMMANDS["inspect-data"].parse(["cfg.yaml", "--n", "2", "--data.path", "x.jsonl"])[0]
    assert parsed["rows"] == 2 and parsed["overrides"] == ["--data.path", "x.jsonl"]
    assert cli.COMMANDS["pairs"].parse_args_only(["p", "--model", "m", "--scorer", "s", "--out", "o", "--n", "3"])["n"] == 3
    assert cli.COMMANDS["plan"].parse(["cfg.yaml", "--data"])[0]["from_data"] is True
    assert cli.COMMANDS["push"].parse_args_only(["me/a", "--repo", "me/b", "--base-model", "org/base"])["base"] == "org/base"
    code, _, err = run(["eval", tmp_path, "--judge", "my/rm"], capsys)
    assert code == 2 and "--judge was replaced by --scorer" in err and "pass --scorer my/rm" in err


def test_push_space_is_a_form_of_push_with_its_own_options(tmp_path, capsys):
    code, _, err = run(["push", "me/adapter", "--space", "me/demo", "--license", "mit"], capsys)
    assert code == 2 and "--license does not apply" in err
    code, _, err = run(["push", "me/adapter"], capsys)
    assert code == 2 and "give --repo OWNER/NAME" in err
    code, _, err = run(["push", tmp_path / "nope", "--repo", "me/x"], capsys)
    assert code == 2 and "nope: no such folder" in err


def test_shared_spellings_set_the_config_keys(tmp_path, capsys):
    code, out, err = run(["train", ROOT / "configs" / "quickstart.yaml", "--data.path", ROOT / "README.md",
                          "--base", tmp_path, "--seed", "7", "--out", tmp_path / "run", "--dry-run"], capsys)
    assert code == 0, err
    assert f"name_or_path: {tmp_path}" in out and "seed: 7" in out and f"output_dir: {tmp_path / 'run'}" in out
    assert "dry run" in out and not (tmp_path / "run").exists()
    code, _, err = run(["train", ROOT / "configs" / "quickstart.yaml", "--seed", "1", "--train.seed", "2"], capsys)
    assert code == 2 and "--seed and --train.seed set the same thing" in err


# ---------------------------------------------------------------------------- checked before work
def test_outputs_are_checked_before_the_work_starts(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    file = tmp_path / "file"
    file.write_text("mine")
    code, _, err = run(["eval", adapter, "--out", file], capsys)
    assert code == 2 and f"--out {file} is a file" in err
    code, _, err = run(["train", ROOT / "configs" / "quickstart.yaml", "--data.path", ROOT / "README.md",
                        "--base", tmp_path, "--train.output_dir", file], capsys)
    assert code == 2 and f"--train.output_dir {file} is a file" in err
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for argv in (["eval", adapter, "--out", theirs], ["quickstart", "--out", theirs],
                 ["train", ROOT / "configs" / "quickstart.yaml", "--data.path", ROOT / "README.md", "--base", tmp_path,
                  "--out", theirs]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "holds files qsimpo does not write there (notes.txt)" in err and "--overwrite" in err, argv
    code, _, err = run(["merge", adapter, "--out", theirs], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = run(["pairs", ROOT / "README.md", "--model", tmp_path, "--scorer", "m:f", "--out", file], capsys)
    assert code == 2 and "was not written by `qsimpo pairs`" in err
    assert file.read_text() == "mine" and (theirs / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, needle", [
    (["eval", "NOPE"], "adapter NOPE: no such folder (nor a Hub id, which reads OWNER/NAME)"),
    (["demo", "--adapter", "./nope"], "--adapter ./nope: no such folder"),
    (["merge", "nope", "--out", "x"], "adapter nope: no such folder"),
    (["merge", "me/a", "--out", "x", "--dtype", "float8"], "invalid choice: 'float8'"),
    (["eval", "me/a", "--batch-size", "many"], "invalid int value: 'many'"),
    (["eval", "me/a", "--scorer", "nope.py:f"], "--scorer nope.py:f: no file nope.py"),
    (["pairs", "nope.jsonl", "--model", "m/m", "--scorer", "a:b", "--out", "o.jsonl"], "nope.jsonl: file not found"),
    (["train", "nope.yaml"], "config file nope.yaml does not exist"),
])
def test_what_the_arguments_alone_show_is_one_message_exit_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(argv, capsys)
    assert code == 2 and err.startswith("error: ") and needle in err and "Traceback" not in err, err


def test_a_missing_folder_under_an_existing_one_is_not_a_hub_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    code, _, err = run(["demo", "--adapter", "adapters/nope"], capsys)
    assert code == 2 and "--adapter adapters/nope: no such folder" in err


def test_argument_errors_come_before_torch_imports(tmp_path):
    """As a user types it: the error, and torch never imported (what makes it fast)."""
    probe = ("import sys; from qsimpo.cli import main; code = main(sys.argv[1:]); "
             "print('torch' in sys.modules, code)")
    for argv in (["eval", str(tmp_path / "nope")], ["merge", "nope", "--out", "x"],
                 ["train", str(ROOT / "configs" / "quickstart.yaml"), "--data.path", "nope.jsonl"]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=tmp_path,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
        assert done.stdout.split() == ["False", "2"], (argv, done.stdout, done.stderr)


def test_dry_run_writes_nothing_and_exits_0(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    code, out, _ = run(["merge", adapter, "--out", tmp_path / "merged", "--dry-run"], capsys)
    assert code == 0 and f"would write into {tmp_path / 'merged'}/" in out and "--dtype 'float32'" in out
    code, out, _ = run(["eval", adapter, "--dry-run"], capsys)
    assert code == 0 and f"would write into {adapter / 'eval'}/" in out
    code, out, _ = run(["quickstart", "--out", tmp_path / "qs", "--dry-run"], capsys)
    assert code == 0 and f"would write into {tmp_path / 'qs'}/" in out
    prompts = tmp_path / "adapter" / "adapter_config.json"  # any existing file will do: nothing reads it
    code, out, _ = run(["pairs", prompts, "--model", "me/m", "--scorer", "m:f", "--out", tmp_path / "p.jsonl",
                        "--num-samples", "3", "--dry-run"], capsys)
    assert code == 0 and f"append pairs to {tmp_path / 'p.jsonl'}" in out and "--num-samples 3" in out
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter", "adapter_config.json"]


def test_the_record_holds_command_settings_and_versions(tmp_path):
    from qsimpo.record import qsimpo_version, read_settings, versions, write_settings

    path = write_settings(tmp_path, {"n": 5}, ["qsimpo", "x"])
    record = json.loads(path.read_text())
    assert path.name == "command.json" and record["command"] == ["qsimpo", "x"] and read_settings(path) == {"n": 5}
    assert set(versions()) >= {"qsimpo", "torch", "transformers", "peft", "bitsandbytes", "datasets"}
    assert qsimpo_version(record) == versions()["qsimpo"]
    for old in ({"qsimpo_version": "0.0.9"}, {"merged_by": "qsimpo 0.0.9"}, {"written_by": "qsimpo 0.0.9"}):
        assert qsimpo_version(old) == "0.0.9"  # files written before the one key
    (tmp_path / "flat.json").write_text('{"n": 3}')
    assert read_settings(tmp_path / "flat.json") == {"n": 3}
