"""What a user reads at the shell when something is wrong: one message, the fix, a non-zero exit, no traceback.

Most cases call `qsimpo.cli.main` in this process, with what it prints captured: the shell adds
nothing to them, and a subprocess costs seconds of imports each. The ones where the process matters
run `python -m qsimpo ...` as a user would: the environment read at import (HF_HUB_OFFLINE,
QSIMPO_DEBUG), and a whole training run. The data cases stop before any model weights load.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HH_SAMPLE
from qsimpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "Name a red fruit.", "chosen": "A strawberry.", "rejected": "The sky is blue."}


def qsimpo(*args: str, cwd: Path | None = None, env: dict | None = None, subprocess_: bool = False):
    """The command's exit code, stdout and stderr: in this process unless ``env`` or ``subprocess_`` needs a new one."""
    if env or subprocess_:
        env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        return subprocess.run([sys.executable, "-m", "qsimpo", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=300)
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["qsimpo", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The run failed with ``code``, printed ``error: ...`` containing every needle, and no traceback."""
    err = result.stderr
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err + result.stdout, err[-3000:]
    assert "error: " in err, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    return err


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_base):
    """A valid train config on the tiny model; each test points data.path at its own file."""
    path = tmp_path_factory.mktemp("cfg") / "train.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "model": {"name_or_path": str(tiny_base)},
        "data": {"path": "unused.jsonl", "max_length": 96},
        "lora": {"r": 4, "alpha": 8},
        "train": {"output_dir": str(path.parent / "out"), "max_steps": 1, "batch_size": 1,
                  "gradient_accumulation_steps": 1, "progress": False},
    }))
    return path


def write_lines(path: Path, lines: list) -> Path:
    body = b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode()) + b"\n"
                    for x in lines)
    path.write_bytes(body)
    return path


# One bad row among good ones: (row as written, reason reported, words of the detail).
BAD_DATA = {
    "malformed_line": ('{"prompt": "a", "chosen": "b",', "malformed_json", "invalid JSON"),
    "missing_rejected": ({"prompt": "a", "chosen": "b"}, "missing_key", "no 'rejected' key"),
    "empty_response": ({**GOOD, "rejected": ""}, "empty_text", "rejected is empty"),
    "whitespace_response": ({**GOOD, "chosen": "   \n"}, "empty_text", "chosen is empty"),
    "identical": ({**GOOD, "rejected": GOOD["chosen"]}, "identical_pair", "identical"),
    "null_prompt": ({**GOOD, "prompt": None}, "empty_text", "prompt is null"),
    "mixed_formats": ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
                       "rejected": [{"role": "assistant", "content": "c"}]}, "mixed_types", "message lists"),
    "number_as_text": ({**GOOD, "chosen": 42}, "mixed_types", "chosen is a int"),
    "not_utf8": (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "not_utf8", "byte 0xe9 at column 16"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_a_bad_row_names_file_line_reason_and_fix(tmp_path, config, case):
    row, reason, detail = BAD_DATA[case]
    data = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, row, GOOD])
    err = assert_clean_error(qsimpo("train", config, "--data.path", data))
    assert f"{data}: 1 bad row of 4 read" in err
    assert f"{reason}: 1 row" in err
    assert f"{data}:line 3: {reason}: " in err and detail in err
    assert "data.on_bad_row: skip" in err
    assert not (config.parent / "out").exists()  # nothing was trained or written


def test_unknown_role_in_conversational_data(tmp_path, config):
    turn = [{"role": "human", "content": "a"}]
    row = {"prompt": turn, "chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]}
    good = {**row, "prompt": [{"role": "user", "content": "a"}]}
    data = write_lines(tmp_path / "roles.jsonl", [good, row])
    assert_clean_error(qsimpo("train", config, "--data.path", data), f"{data}:line 2: unknown_role", "human -> user")


def test_the_whole_file_is_judged_at_once(tmp_path, config):
    rows = [GOOD] * 3 + [row for row, _, _ in BAD_DATA.values()] + ['{"oops"'] * 5
    data = write_lines(tmp_path / "many.jsonl", rows)
    err = assert_clean_error(qsimpo("train", config, "--data.path", data))
    n_bad = len(BAD_DATA) + 5
    assert f"{n_bad} bad rows of {3 + n_bad} read; nothing was trained" in err
    for _, reason, _ in BAD_DATA.values():
        assert f"  {reason}: " in err
    assert "malformed_json: 6 rows" in err and "... and 3 more" in err  # counts cover every row, 3 locations shown
    assert "train on the other 3" in err


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_skip_trains_on_the_rest_and_reports_the_same_table(tmp_path, config):
    rows = [GOOD, {**GOOD, "chosen": "A cherry."}, {**GOOD, "rejected": ""}, '{"x":', {**GOOD, "chosen": "An apple."}]
    data = write_lines(tmp_path / "skip.jsonl", rows)
    out = tmp_path / "run"
    result = qsimpo("train", config, "--data.path", data, "--data.on_bad_row", "skip", "--train.output_dir", out,
                    subprocess_=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data {data}: 5 rows read, 3 kept, 2 dropped" in result.stdout
    assert "skipped bad rows (data.on_bad_row: skip):" in result.stdout
    assert f"{data}:line 3: empty_text" in result.stdout and f"{data}:line 4: malformed_json" in result.stdout
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["data"]["train"]["dropped"]["empty_text"] == 1 and meta["data"]["train"]["kept"] == 3


@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason=f"the HH-RLHF sample is not at {HH_SAMPLE}")
def test_real_hh_rlhf_reports_both_empty_responses_in_one_run(config):
    err = assert_clean_error(qsimpo("inspect-data", config, "--data.path", HH_SAMPLE, "--data.format", "implicit"))
    assert "2 bad rows of 1500 read" in err and "empty_text: 2 rows" in err
    assert err.count(f"{HH_SAMPLE}:line ") == 2


@pytest.mark.parametrize("case", ["empty", "empty_json_list", "blank_lines", "missing", "json_not_utf8", "json_dict", "csv"])
def test_whole_source_problems(tmp_path, config, case):
    if case == "empty":
        data, needles = write_lines(tmp_path / "empty.jsonl", []), ["empty.jsonl: no rows: the source is empty"]
    elif case == "empty_json_list":
        data = tmp_path / "rows.json"
        data.write_text("[]")
        needles = ["rows.json: no rows: the source is empty"]
    elif case == "json_dict":
        data = tmp_path / "rows.json"
        data.write_text('{"train": []}')
        needles = ["rows.json: expected a JSON list of row objects", "with keys train"]
    elif case == "blank_lines":
        data, needles = write_lines(tmp_path / "blank.jsonl", ["", "  "]), ["blank.jsonl: no rows"]
    elif case == "missing":
        data, needles = tmp_path / "nope.jsonl", ["nope.jsonl: file not found", "check data.path"]
    elif case == "json_not_utf8":
        data = tmp_path / "rows.json"
        data.write_bytes(b'[\n{"prompt": "ok",\n "chosen": "caf\xe9"}]')
        needles = ["rows.json:line 3: byte 0xe9 at column 16 is not UTF-8", "re-save the file as UTF-8"]
    else:
        data = tmp_path / "rows.csv"
        data.write_text("prompt,chosen,rejected\n")
        needles = ["unsupported file type '.csv'"]
    assert_clean_error(qsimpo("train", config, "--data.path", data), *needles)


def test_config_problems_are_listed_together(tmp_path, config):
    err = assert_clean_error(qsimpo("train", config, "--lora.alhpa", "8", "--simpo.beta", "-1", "--train.batch_size", "x"))
    assert "(3 problems)" in err and "did you mean lora.alpha?" in err and "simpo.beta = -1 must be > 0" in err
    assert_clean_error(qsimpo("train", tmp_path / "nope.yaml"), "config file", "does not exist")


def test_missing_model_and_adapters(tmp_path, config, pref_jsonl):
    for command in ("train", "plan", "inspect-data"):
        assert_clean_error(qsimpo(command, config, "--data.path", pref_jsonl, "--model.name_or_path", tmp_path / "no-model"),
                           "model.name_or_path", "could not be loaded", "local model folder")
    offline = qsimpo("plan", config, "--model.name_or_path", "nobody-has/this-model", env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(offline, "'nobody-has/this-model' could not be loaded")  # a Hub id that cannot be reached
    for command in (["eval", tmp_path / "no-adapter"], ["merge", tmp_path / "no-adapter", "--out", tmp_path / "m"],
                    ["push", tmp_path / "no-adapter", "--repo", "me/x", "--dry-run"]):
        assert_clean_error(qsimpo(*command), "no-adapter: no such folder", code=2)  # the same rule for every command
    assert_clean_error(qsimpo("eval", tmp_path / "no-adapter", "--max-rows", "0"), "--max-rows 0", ">= 1")


def test_command_options_are_checked_by_argparse(tmp_path):
    assert_clean_error(qsimpo("merge", tmp_path / "a", "--out", tmp_path / "m", "--dtype", "float8"), "invalid choice: 'float8'")
    assert_clean_error(qsimpo("eval", tmp_path / "a", "--batch-size", "many"), "invalid int value: 'many'")


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_debug_shows_the_traceback(tmp_path, config, monkeypatch):
    data = write_lines(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "rejected": ""}])
    result = qsimpo("train", config, "--data.path", data, "--debug", subprocess_=True)
    assert result.returncode == 2 and "Traceback" in result.stderr and "empty_text" in result.stderr
    monkeypatch.setenv("QSIMPO_DEBUG", "1")  # does what --debug does (in this process: the same main, read at call)
    result = qsimpo("train", config, "--data.path", data)
    assert result.returncode == 2 and "Traceback" in result.stderr and "empty_text" in result.stderr
