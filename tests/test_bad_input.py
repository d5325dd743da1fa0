"""Bad input across every command, as a matrix: each path a command takes, against the faults users meet.

A path is a config (YAML), data (JSONL), a base model folder or .gguf file, an adapter folder, a scorer
file or an output. Each fault is written into a scratch folder (missing; a file where a folder belongs
and the reverse; empty; a damaged file of each kind qsimpo reads: YAML, JSON, JSONL, safetensors, GGUF;
a folder of the wrong kind: a merged model where an adapter belongs, a run with no adapter yet). Every
case must end the same way: a non-zero exit, one `error:` message naming the path, no traceback, and
every file the user had left as it was. Cases run in this process (`qsimpo.cli.main`), as the shell
adds nothing to them; the demo, which would serve forever if a fault slipped through, runs as a
subprocess with a time limit. (Unreadable files are not in the matrix: the suite runs as root, whom
file permissions do not stop.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_cli_errors import ROOT, qsimpo

GOOD = {"prompt": "Name a red fruit.", "chosen": "A strawberry.", "rejected": "The sky is blue."}
SCORER = "qsimpo.pairs.examples:follows_instructions"


# --------------------------------------------------------------------------------------------- the faults
def missing(tmp: Path, kind: str) -> Path:
    return tmp / ("nope.jsonl" if kind == "jsonl" else "nope.yaml" if kind == "yaml" else "nope")


def file_for_folder(tmp: Path, kind: str) -> Path:
    (tmp / "a-file").write_text("not a folder\n")
    return tmp / "a-file"


def folder_for_file(tmp: Path, kind: str) -> Path:
    (tmp / f"a-folder.{kind}").mkdir()
    return tmp / f"a-folder.{kind}"


def empty(tmp: Path, kind: str) -> Path:
    if kind in ("model", "adapter"):
        (tmp / "empty").mkdir()
        return tmp / "empty"
    (tmp / f"empty.{kind}").write_text("")
    return tmp / f"empty.{kind}"


def damaged_text(tmp: Path, kind: str) -> Path:
    """A file of the kind, cut short or not that format at all."""
    body = {"yaml": "model: {name_or_path: [unclosed\n", "jsonl": b"\x89PNG\r\n\x1a\n\x00\x00garbage\xff\xfe\n"}[kind]
    path = tmp / f"damaged.{kind}"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return path


def _cut_copy(tmp: Path, good: Path, name: str, keep: float) -> Path:
    """A copy of the good folder ``good`` whose file ``name`` is cut to the first ``keep`` of its bytes."""
    folder = shutil.copytree(good, tmp / f"cut-{name}")
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: int(len(data) * keep)])
    return folder


def damaged_config_json(tmp: Path, kind: str, good: Path) -> Path:
    """A copy of a good model or adapter folder whose config JSON is cut short."""
    return _cut_copy(tmp, good, "adapter_config.json" if kind == "adapter" else "config.json", 1 / 2)


def damaged_weights(tmp: Path, kind: str, good: Path) -> Path:
    """A copy of a good model or adapter folder whose safetensors file is cut short."""
    return _cut_copy(tmp, good, "adapter_model.safetensors" if kind == "adapter" else "model.safetensors", 1 / 3)


def damaged_gguf(tmp: Path, kind: str) -> Path:
    path = tmp / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)  # the magic and a version, then nothing whole
    return path


def merged_model(tmp: Path, kind: str, good_base: Path) -> Path:
    """A full model (what `qsimpo merge` writes) where an adapter belongs."""
    return shutil.copytree(good_base, tmp / "merged")


def run_without_adapter(tmp: Path, kind: str) -> Path:
    """A run folder that has started (config, a partial checkpoint) but holds no adapter yet."""
    run = tmp / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name_or_path: somewhere}\n")
    return run


# ------------------------------------------------------------------------------------------- the paths
@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_base, tiny_adapters):
    """The good inputs each case keeps but one: a config, data, prompts, the tiny base, an adapter."""
    root = tmp_path_factory.mktemp("good")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(4)))
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Name a red fruit. Answer in lowercase."}) + "\n")
    config = root / "train.yaml"
    config.write_text(json.dumps({"model": {"name_or_path": str(tiny_base)}, "data": {"path": str(data), "max_length": 96},
                                  "lora": {"r": 4, "alpha": 8},
                                  "train": {"output_dir": str(root / "out"), "max_steps": 1, "batch_size": 1,
                                            "gradient_accumulation_steps": 1, "progress": False}}))
    return {"config": config, "data": data, "prompts": prompts, "base": Path(tiny_base), "adapter": Path(tiny_adapters[0])}


def argv(command: str, role: str, bad: Path, g: dict, tmp: Path) -> list[str]:
    """The command line with ``bad`` in the place of ``role``, every other path good."""
    b = str(bad)
    return {
        ("train", "config"): ["train", b],
        ("train", "data"): ["train", g["config"], "--data.path", b],
        ("train", "base"): ["train", g["config"], "--base", b],
        ("train", "out"): ["train", g["config"], "--out", b],
        ("sft", "config"): ["sft", b],
        ("plan", "config"): ["plan", b],
        ("inspect-data", "data"): ["inspect-data", g["config"], "--data.path", b],
        ("eval", "adapter"): ["eval", b, "--data", g["data"]],
        ("eval", "data"): ["eval", g["adapter"], "--data", b, "--out", tmp / "eval-out"],
        ("eval", "out"): ["eval", g["adapter"], "--data", g["data"], "--out", b],
        ("merge", "adapter"): ["merge", b, "--out", tmp / "merged-out"],
        ("merge", "out"): ["merge", g["adapter"], "--out", b],
        ("push", "folder"): ["push", b, "--repo", "someone/thing", "--dry-run"],
        ("pairs", "prompts"): ["pairs", b, "--model", g["base"], "--scorer", SCORER, "--out", tmp / "p.jsonl"],
        ("pairs", "base"): ["pairs", g["prompts"], "--model", b, "--scorer", SCORER, "--out", tmp / "p.jsonl"],
        ("pairs", "scorer"): ["pairs", g["prompts"], "--model", g["base"], "--scorer", f"{b}:score", "--out",
                              tmp / "p.jsonl"],
        ("pairs", "out"): ["pairs", g["prompts"], "--model", g["base"], "--scorer", SCORER, "--out", b],
        ("demo", "adapter"): ["demo", "--adapter", b, "--port", "1"],
    }[command, role]


ROLES = {  # (command, role): the kind of path it takes
    ("train", "config"): "yaml", ("sft", "config"): "yaml", ("plan", "config"): "yaml",
    ("train", "data"): "jsonl", ("inspect-data", "data"): "jsonl", ("eval", "data"): "jsonl",
    ("pairs", "prompts"): "jsonl",
    ("train", "base"): "model", ("pairs", "base"): "model",
    ("eval", "adapter"): "adapter", ("merge", "adapter"): "adapter", ("demo", "adapter"): "adapter",
    ("push", "folder"): "adapter",
    ("pairs", "scorer"): "py",
    ("train", "out"): "out", ("eval", "out"): "out", ("merge", "out"): "out", ("pairs", "out"): "pairs-out",
}
FAULTS = {  # the kind of path -> the faults it meets
    "yaml": ["missing", "folder_for_file", "empty", "damaged_text"],
    "jsonl": ["missing", "folder_for_file", "empty", "damaged_text"],
    "model": ["missing", "file_for_folder", "empty", "damaged_config_json", "damaged_weights", "damaged_gguf"],
    "adapter": ["missing", "file_for_folder", "empty", "damaged_config_json", "damaged_weights", "merged_model",
                "run_without_adapter"],
    "py": ["missing"],
    "out": ["file_for_folder"],
    "pairs-out": ["folder_for_file"],
}
CASES = [(c, r, f) for (c, r), kind in ROLES.items() for f in FAULTS[kind]]


def make_bad(fault: str, kind: str, tmp: Path, g: dict) -> Path:
    if fault in ("damaged_config_json", "damaged_weights"):
        return globals()[fault](tmp, kind, g["adapter"] if kind == "adapter" else g["base"])
    if fault == "merged_model":
        return merged_model(tmp, kind, g["base"])
    if fault == "missing" and kind == "py":
        return tmp / "nope_scorer.py"
    return globals()[fault](tmp, kind)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under ``folders`` with a hash of its bytes: what the user had."""
    files = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files


@pytest.mark.parametrize("command,role,fault", CASES, ids=[f"{c}-{r}-{f}" for c, r, f in CASES])
def test_a_bad_path_is_one_clean_message_and_nothing_is_lost(command, role, fault, good, tmp_path, monkeypatch):
    kind = ROLES[command, role]
    bad = make_bad(fault, kind, tmp_path, good)
    args = [str(a) for a in argv(command, role, bad, good, tmp_path)]
    before = snapshot(tmp_path, *(p for p in good.values() if Path(p).is_dir()), *(Path(p).parent for p in good.values()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name that could be a Hub id is not looked up there
    if command == "demo":  # it would serve forever if the fault slipped through: a process with a time limit
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-m", "qsimpo", *args], capture_output=True, text=True, env=env,
                                timeout=240, cwd=tmp_path)
    else:
        result = qsimpo(*args, cwd=tmp_path)
    err = result.stderr
    assert result.returncode not in (0, None), (args, result.stdout[-1500:], err[-1500:])
    assert "Traceback" not in err + result.stdout, err[-3000:]
    assert err.count("error: ") == 1, err[-3000:]
    assert str(bad) in err or bad.name in err, (str(bad), err[-2000:])
    after = snapshot(tmp_path, *(p for p in good.values() if Path(p).is_dir()), *(Path(p).parent for p in good.values()))
    assert {k: v for k, v in after.items() if k in before} == before, "a file the user had was changed or deleted"
    assert set(before) <= set(after), f"deleted: {sorted(set(before) - set(after))}"
