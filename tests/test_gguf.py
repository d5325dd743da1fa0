"""A GGUF file as model.name_or_path, without the real model: where the file is looked for, the
errors a bad file gives (through the command line, as a user meets them), and that a failed
conversion leaves nothing in the cache. tests/test_real_model.py converts and trains a real GGUF.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qsimpo.config import ModelConfig, load_config
from qsimpo.errors import InputNotFound, UsageError

ROOT = Path(__file__).resolve().parents[1]


def write_gguf(path: Path) -> Path:
    """A small well-formed GGUF file: llama metadata and one float32 tensor of 8 KiB."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QSIMPO_CACHE", str(root))
    return root


def _train_config(tmp_path, model, data) -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(f"model:\n  name_or_path: {model}\ndata:\n  path: {data}\ntrain:\n  output_dir: {tmp_path / 'out'}\n")
    return config


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
@pytest.mark.parametrize("case", ["not-gguf", "truncated"])
def test_bad_gguf_is_a_clear_error_on_the_command_line(case, tmp_path, pref_jsonl):
    model = tmp_path / "model.gguf"
    if case == "not-gguf":
        model.write_text('{"architectures": ["LlamaForCausalLM"]}\n')  # a config.json saved under the wrong name
        expect = [f"{model} is not a GGUF file", "starts with b'{\"ar'", "download it again"]
    else:
        whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
        model.write_bytes(whole[: len(whole) // 2])  # a download cut off halfway through the tensor data
        expect = [f"{model} is a truncated or damaged GGUF file ({len(whole) // 2:,} bytes", "download it again"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSIMPO_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "qsimpo", "train", str(_train_config(tmp_path, model, pref_jsonl))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(phrase in errors[0] for phrase in expect), done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "gguf").exists()


def test_missing_gguf_file(tmp_path, pref_jsonl, capsys):
    from qsimpo.cli import main

    model = tmp_path / "gone.gguf"
    assert main(["train", str(_train_config(tmp_path, model, pref_jsonl))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model.name_or_path = '{model}' could not be loaded") and "no such" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("cut", [0, 3, 10, 200, 5000])
def test_every_cut_of_a_gguf_file_is_called_truncated(tmp_path, cut):
    from qsimpo.gguf_in import _check_magic, check

    whole = write_gguf(tmp_path / "whole.gguf")
    check(whole)  # the uncut file passes
    cut_file = tmp_path / "cut.gguf"
    cut_file.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(UsageError, match=rf"cut.gguf is a truncated or damaged GGUF file \({cut:,} bytes"):
        _check_magic(cut_file)
        check(cut_file)


def test_where_a_gguf_file_is_looked_for(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from qsimpo.gguf_in import is_gguf, locate

    folder = tmp_path / "models"
    folder.mkdir()
    f = write_gguf(folder / "m.Q4.gguf")
    assert not is_gguf(ModelConfig(name_or_path=str(folder))) and is_gguf(ModelConfig(name_or_path="x/M.GGUF"))
    assert locate(ModelConfig(name_or_path=str(f))) == f
    assert locate(ModelConfig(name_or_path=str(folder), gguf_file="m.Q4.gguf")) == f
    with pytest.raises(InputNotFound, match=r"GGUF file .*other.gguf does not exist"):
        locate(ModelConfig(name_or_path=str(folder), gguf_file="other.gguf"))
    with pytest.raises(InputNotFound, match=r"no such folder .*model.gguf_file = 'm.Q4.gguf'"):
        locate(ModelConfig(name_or_path=str(tmp_path / "gone"), gguf_file="m.Q4.gguf"))

    # a Hub repo and a file in it: served from a Hub cache, offline
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    write_gguf(repo / "snapshots" / commit / "tiny.Q8_0.gguf")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    got = locate(ModelConfig(name_or_path="someone/tiny-GGUF", gguf_file="tiny.Q8_0.gguf"))
    assert got.name == "tiny.Q8_0.gguf" and got.read_bytes() == f.read_bytes()
    with pytest.raises(InputNotFound, match=r"could not fetch nope.gguf from the Hub repo someone/tiny-GGUF .*HF_TOKEN"):
        locate(ModelConfig(name_or_path="someone/tiny-GGUF", gguf_file="nope.gguf"))


def test_gguf_file_field_is_checked_with_the_config():
    fill = ["--data.path", "d.jsonl"]
    cfg = load_config(None, ["--model.name_or_path", "org/m-GGUF", "--model.gguf_file", "m.Q4_K_M.gguf", *fill])
    assert cfg.model.gguf_file == "m.Q4_K_M.gguf"
    with pytest.raises(UsageError) as err:
        load_config(None, ["--model.name_or_path", "org/m", "--model.gguf_file", "m.safetensors", *fill])
    assert "model.gguf_file = 'm.safetensors'" in str(err.value) and "ending in .gguf" in str(err.value)
    with pytest.raises(UsageError, match="leave gguf_file unset and point name_or_path at the .gguf file"):
        load_config(None, ["--model.name_or_path", "a.gguf", "--model.gguf_file", "b.gguf", *fill])


def test_failed_conversion_leaves_no_folder_and_a_later_one_is_reused(tmp_path, cache, monkeypatch):
    from qsimpo import gguf_in as gguf

    f = write_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr(gguf, "_tokenizer", lambda path: None)

    def broken(path):
        raise RuntimeError("conversion failed halfway")

    monkeypatch.setattr(gguf, "_plain_model", broken)
    with pytest.raises(RuntimeError, match="halfway"):
        gguf.converted(f)
    assert list((cache / "gguf").iterdir()) == [], "no partial folder may stay in the cache"

    class Saved:
        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")

    calls = []
    monkeypatch.setattr(gguf, "_tokenizer", lambda path: Saved())
    monkeypatch.setattr(gguf, "_plain_model", lambda path: calls.append(path) or Saved())
    folder = gguf.converted(f)
    digest = gguf.sha256(f)
    assert folder == cache / "gguf" / digest[:16] and sorted(p.name for p in folder.iterdir()) == ["config.json", "gguf_source.json"]
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"] == digest
    renamed = f.rename(tmp_path / "renamed.gguf")
    assert gguf.converted(renamed) == folder and calls == [f], "the same content is converted once, whatever its name"


def test_an_adapter_finds_its_gguf_base_through_qsimpo_json(tmp_path, monkeypatch):
    """qsimpo.json records the base as given (folder + model.gguf_file here); eval, demo and merge load it back."""
    import peft

    from qsimpo.train import model as model_mod
    from qsimpo.train.model import base_config

    meta = {"base_model": "models/smol", "base_model_gguf_file": "smol.Q4_1.gguf", "quantization": "nf4"}
    (tmp_path / "qsimpo.json").write_text(json.dumps(meta))
    seen = []
    monkeypatch.setattr(model_mod, "load_tokenizer", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(model_mod, "load_base", lambda cfg, device=None: seen.append(cfg))
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", lambda *a, **kw: type("M", (), {"eval": lambda self: None})())
    model_mod.load_trained(str(tmp_path))
    assert [(c.name_or_path, c.gguf_file) for c in seen] == [("models/smol", "smol.Q4_1.gguf")] * 2
    seen.clear()
    model_mod.load_trained(str(tmp_path), base="other/model")  # --base replaces the recorded base, file and all
    assert [(c.name_or_path, c.gguf_file) for c in seen] == [("other/model", None)] * 2
    assert base_config("models/smol", meta, quantization="none").gguf_file == "smol.Q4_1.gguf"
    assert base_config("other/model", meta).gguf_file is None
