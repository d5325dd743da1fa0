"""qsimpo.run_dir is the one reader and writer of a run folder's files (config.yaml, qsimpo.json, metrics.jsonl).

merge, verify and push go through it (merge copies the run's config.yaml and writes its own qsimpo.json,
push reads both); a test here fails when some module opens one of those files by name again.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qsimpo
from qsimpo import run_dir
from qsimpo.config import dump_yaml, load_config

PACKAGE = Path(qsimpo.__file__).parent
RUN_FILES = {run_dir.CONFIG, run_dir.META, run_dir.METRICS, run_dir.CHECKPOINT_MARKER}


def test_only_run_dir_names_a_run_file_as_a_path():
    """`folder / "qsimpo.json"`, open("config.yaml"), Path(..., "metrics.jsonl"): only in run_dir.py."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "run_dir.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                operands = [node.right]
            elif isinstance(node, ast.Call):
                operands = list(node.args)
            else:
                continue
            found += [f"{path.relative_to(PACKAGE.parent)}:{o.lineno} {o.value}" for o in operands
                      if isinstance(o, ast.Constant) and o.value in RUN_FILES]
    assert not found, "read or write these through qsimpo.run_dir: " + ", ".join(found)


def test_meta_written_updated_and_read_back(tmp_path):
    run_dir.write_meta(tmp_path, {"base_model": "org/base", "global_step": 3})
    run_dir.update_meta(tmp_path, verify={"passed": True})
    assert run_dir.read_meta(tmp_path) == {"base_model": "org/base", "global_step": 3, "verify": {"passed": True}}
    assert (tmp_path / run_dir.META).read_text() == run_dir.json_text(run_dir.read_meta(tmp_path))


def test_config_written_copied_and_read_back(tmp_path):
    cfg = load_config(None, ["--model.name_or_path", "org/base", "--data.path", "org/prefs", "--data.max_length", "64"])
    run, merged = tmp_path / "run", tmp_path / "merged"
    run.mkdir(), merged.mkdir()
    run_dir.write_config(run, cfg)
    assert run_dir.read_config(run) == cfg
    assert run_dir.read_config_yaml(run)["data"]["max_length"] == 64  # as written, not validated
    run_dir.copy_config(run, merged)
    assert (merged / run_dir.CONFIG).read_text() == (run / run_dir.CONFIG).read_text() == dump_yaml(cfg)

    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir.copy_config(empty, merged / "nothing")  # a run without one: nothing copied, nothing raised
    assert run_dir.read_config(empty) is None and run_dir.read_config_yaml(empty) == {}
    assert not (merged / "nothing").exists()
