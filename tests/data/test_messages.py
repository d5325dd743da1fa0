"""What a person reads at the shell when the data and the data settings disagree: `qsimpo inspect-data CONFIG`.

Each case runs qsimpo as a subprocess on a fixture in a real data set's layout (tests/data/fixtures/)
and asserts on the message: what the rows look like, the setting to change, the rows it is about.
The data is judged before any model loads, so most cases need no model at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsimpo.config import DataConfig
from qsimpo.data import DataError, read_source

pytestmark = pytest.mark.usefixtures("processes")  # every test here starts processes: integration tier

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HH = FIXTURES / "Anthropic" / "hh-rlhf"
ORCA = FIXTURES / "Intel" / "orca_dpo_pairs"
H4 = FIXTURES / "HuggingFaceH4" / "ultrafeedback_binarized"


def inspect_data(model, *overrides) -> subprocess.CompletedProcess:
    config = Path(os.environ.get("TMPDIR", "/tmp")) / f"qsimpo-messages-{os.getpid()}.yaml"
    config.write_text(json.dumps({"model": {"name_or_path": str(model)}, "data": {"path": "unused.jsonl"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qsimpo", "inspect-data", str(config), *map(str, overrides)],
                          capture_output=True, text=True, env=env, timeout=300)


def error(result: subprocess.CompletedProcess) -> str:
    """The one error a person reads: exit code 2, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return result.stderr


def test_hh_transcripts_read_as_explicit_say_they_look_implicit():
    err = error(inspect_data("no-model-needed", "--data.path", HH, "--data.data_dir", "harmless-base",
                             "--data.format", "explicit"))
    assert f"{HH}: 8 bad rows of 8 read" in err and "missing_key: 8 rows" in err
    assert f"{HH}/harmless-base[train] row 0: missing_key: no 'prompt' key" in err
    assert "every row looks implicit (HH transcripts), but data.format is explicit: set data.format: implicit (or auto)" in err


def test_message_lists_read_as_explicit_say_they_look_conversational():
    err = error(inspect_data("no-model-needed", "--data.path", H4, "--data.split", "train_prefs", "--data.format", "explicit",
                             "--data.on_bad_row", "skip"))
    assert "no usable pairs" in err and "8 rows read, 0 kept, 8 dropped (mixed_types 8)" in err
    assert ("every row looks conversational (message lists), but data.format is explicit: "
            "set data.format: conversational (or auto)") in err
    assert "too_long" not in err and "max_length" not in err  # only what happened


def test_a_prompt_in_a_column_of_another_name_points_at_data_columns():
    err = error(inspect_data("no-model-needed", "--data.path", ORCA))
    assert "10 bad rows of 10 read" in err and "no_shared_prompt: 10 rows" in err
    assert "every row looks implicit (chosen and rejected strings, no prompt) and data.format: auto detected implicit" in err
    assert "map it with data.columns, e.g. data.columns: {prompt: COLUMN} (columns: system, question, chosen, rejected)" in err


def test_a_mapped_column_the_rows_lack_is_named_with_the_row_and_the_fix():
    err = error(inspect_data("no-model-needed", "--data.path", ORCA, "--data.columns", "{prompt: instruction}"))
    assert (f"{ORCA}[train] row 0: missing_key: no column 'instruction' for data.columns.prompt "
            "(columns: system, question, chosen, rejected); set data.columns.prompt to the column that holds the prompt") in err
    assert "data.columns.prompt names the column 'instruction', which the rows do not have" in err


def test_unknown_roles_in_data_columns_stop_before_any_row_is_read():
    with pytest.raises(DataError, match=r"data.columns: unknown role 'question'; the keys are qsimpo's roles "
                                        r"\(prompt, chosen, rejected, system\)"):
        read_source(DataConfig(path=str(ORCA), columns={"question": "prompt"}))


def test_orca_reads_through_data_columns_with_its_system_message(tiny_base):
    result = inspect_data(tiny_base, "--data.path", ORCA, "--data.columns", "{prompt: question, system: system}", "--n", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"data {ORCA}: 10 rows read, 10 kept, 0 dropped" in out
    assert f"═══ {ORCA}[train] row 1 ═══" in out and "<|system|>\nYou are an AI assistant." in out
    assert out.count("<|user|>\nGive me a tip for learning to juggle.") == 1


def test_no_usable_pairs_names_only_the_reasons_that_occurred(tmp_path):
    # A validated config always leaves a response room (max_prompt_length < max_length), so too_long is forced here.
    from qsimpo.data import build_dataset
    from qsimpo.quickstart.toy import build_tokenizer

    tok = build_tokenizer(["Name a fruit. An apple. A chair."] * 5)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "Name a fruit " * 40, "chosen": "An apple.", "rejected": "A chair."}) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(path=str(data), max_length=5, max_prompt_length=30), tok)
    assert "no usable pairs" in str(err.value) and "1 dropped (too_long 1)" in str(err.value)
    assert "fix: too_long: raise data.max_length or lower data.max_prompt_length" in str(err.value)
    assert "chat_template" not in str(err.value) and "data.format" not in str(err.value)


def test_a_failing_template_is_not_told_to_raise_max_length(tmp_path):
    from qsimpo.data import build_dataset
    from qsimpo.quickstart.toy import build_tokenizer

    tok = build_tokenizer(["Name a red fruit. A strawberry. The sky is blue."] * 5)
    tok.chat_template = "{{ raise_exception('no template today') }}"
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Name a red fruit.", "chosen": "A strawberry.", "rejected": "The sky is blue."}) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(path=str(data), on_bad_row="skip"), tok)
    assert "no usable pairs" in str(err.value) and "fix: chat_template: use a tokenizer" in str(err.value)
    assert "max_length" not in str(err.value)
