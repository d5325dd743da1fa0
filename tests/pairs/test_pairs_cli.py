"""`python -m qsimpo pairs ...` as a user types it: each mistake is one line naming what to fix, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

EXAMPLE = "qsimpo.pairs.examples:concise_complete"


@pytest.mark.parametrize("case", ["scorer does not import", "not a reward model", "no prompts", "no model"])
def test_mistakes_are_one_line(case, tiny_base, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me about owls."}) + "\n")
    model, scorer, expected = str(tiny_base), EXAMPLE, ""
    if case == "scorer does not import":
        scorer, expected = "my_scorers:helpful", "error: --scorer my_scorers:helpful: the module my_scorers does not import"
    elif case == "not a reward model":
        scorer, expected = str(tiny_base), f"error: --scorer {tiny_base} is not a sequence classifier"
    elif case == "no prompts":
        prompts.write_text("")
        expected = f"error: {prompts}: no rows: the source is empty"
    else:
        model, expected = "./absent-model", "error: --model ./absent-model: no such file or folder"
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([sys.executable, "-m", "qsimpo", "pairs", str(prompts), "--model", model, "--scorer", scorer,
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(expected), done.stderr
    assert not out.exists()
