"""SimPO on top of `qsimpo sft` (model.sft_adapter): the SFT adapter stays as trained, the saved aligned adapter
computes base + SFT + SimPO, and eval's SFT side is the SFT model, not the base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config
from qsimpo.train.recipe import train
from qsimpo.train.sft import sft


@pytest.fixture(scope="module")
def sft_run(tiny_base, tmp_path_factory, pref_rows):
    root = tmp_path_factory.mktemp("stack")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                     {"role": "assistant", "content": r["chosen"]}]}) + "\n"
                            for r in pref_rows))
    cfg = make_config(tiny_base, data, root / "sft", "--train.max_steps", "3", "--data.max_length", "256",
                      "--train.learning_rate", "3e-2")
    return sft(cfg).output_dir


@pytest.fixture(scope="module")
def stacked(tiny_base, pref_jsonl, sft_run, tmp_path_factory):
    cfg = make_config(tiny_base, pref_jsonl, tmp_path_factory.mktemp("stack") / "simpo", "--train.max_steps", "2",
                      "--model.sft_adapter", str(sft_run), "--data.eval", "0.1")
    return train(cfg)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sft_adapter_frozen_and_aligned_adapter_is_the_stack(stacked, sft_run, tiny_base, one_thread):
    from peft import PeftModel

    from qsimpo.config import ModelConfig
    from qsimpo.train.model import load_base, load_trained

    out = stacked.output_dir
    sft_before, sft_after = load_file(sft_run / "adapter_model.safetensors"), load_file(out / "sft" / "adapter_model.safetensors")
    assert sft_before.keys() == sft_after.keys() and all(torch.equal(sft_before[k], sft_after[k]) for k in sft_before)
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["sft_adapter"] == {"subfolder": "sft", "source": str(sft_run)} and meta["chat_template"]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # 4 (SFT) + 4 (SimPO)

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    trained = stacked.trainer.model  # base + SFT + SimPO, both adapters active
    assert trained.base_model.active_adapters == ["default", "sft"]
    model, _ = load_trained(str(out))
    aligned = _logits(model, ids)
    assert torch.allclose(aligned, _logits(trained, ids), atol=1e-4)
    from qsimpo.train.stack import sft_side

    with sft_side(model):
        sft_logits = _logits(model, ids)
    reference = PeftModel.from_pretrained(load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu"), str(sft_run))
    assert torch.allclose(sft_logits, _logits(reference, ids), atol=1e-5)
    with model.disable_adapter():
        base_logits = _logits(model, ids)
    assert not torch.allclose(sft_logits, base_logits, atol=1e-3)  # the SFT side is not the bare base
    assert not torch.allclose(sft_logits, aligned, atol=1e-4)


def test_eval_sft_side_is_the_sft_model(stacked, sft_run, tiny_base, pref_jsonl, tmp_path, one_thread):
    from peft import PeftModel

    from qsimpo.config import ModelConfig
    from qsimpo.eval.evaluate import evaluate
    from qsimpo.response_logps import score_pairs
    from qsimpo.train.model import load_base, load_tokenizer
    from qsimpo.data import build_dataset
    from qsimpo.run_dir import read_config

    result = evaluate(str(stacked.output_dir), out=str(tmp_path / "eval"))
    cfg = read_config(stacked.output_dir)
    tok = load_tokenizer(cfg.model)
    pairs, _ = build_dataset(cfg.data, tok)
    from qsimpo.data import split_eval

    _, held = split_eval(pairs, 0.1, cfg.train.seed)
    reference = PeftModel.from_pretrained(load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu"), str(sft_run))
    want = score_pairs(reference, held, tok.pad_token_id)
    got = result["per_pair"]["sft_logp_chosen"]
    assert got == pytest.approx(want.chosen.tolist(), abs=1e-5)


def test_resume_keeps_the_sft_adapter_on(tiny_base, pref_jsonl, sft_run, tmp_path, one_thread):
    """peft's resume path re-activates only "default": a resumed stacked run must end where the full run ends."""
    import shutil

    args = ("--train.max_steps", "3", "--train.save_steps", "2", "--model.sft_adapter", str(sft_run))
    full = train(make_config(tiny_base, pref_jsonl, tmp_path / "full", *args)).output_dir
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train(make_config(tiny_base, pref_jsonl, resumed, *args, "--train.resume_from", "auto"))
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_demo_left_column_is_the_sft_model(stacked, sft_run, tiny_base, one_thread):
    """The demo answers both columns in one batch with peft's per-row adapter_names: the left rows use "sft"."""
    from peft import PeftModel

    from qsimpo.config import ModelConfig
    from qsimpo.demo.sides import SideBySide
    from qsimpo.train.model import load_base

    sides = SideBySide.load(str(stacked.output_dir), device="cpu")
    assert sides.sides["left"].adapter == "sft" and sides.sides["right"].adapter == "default"
    ids = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        both = sides.model(input_ids=ids, adapter_names=["sft", "default"]).logits
    reference = PeftModel.from_pretrained(load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu"), str(sft_run))
    assert torch.allclose(both[0], _logits(reference, ids[:1])[0], atol=1e-5)
    assert torch.allclose(both[1], _logits(stacked.trainer.model, ids[:1])[0], atol=1e-4)


def test_push_takes_the_sft_adapter_along(stacked):
    from qsimpo.export.hub import select_files

    files = select_files(stacked.output_dir, "adapter")
    assert {"adapter_model.safetensors", "sft/adapter_model.safetensors", "sft/adapter_config.json"} <= set(files)
    assert not any(f.startswith("checkpoint-") for f in files)


def test_sft_adapter_of_another_base_is_refused_before_loading(sft_run, pref_jsonl, tmp_path):
    from qsimpo.config import ConfigError

    cfg = make_config(tmp_path / "other-base", pref_jsonl, tmp_path / "out", "--model.sft_adapter", str(sft_run))
    with pytest.raises(ConfigError, match="was trained on .* set --model.name_or_path"):
        train(cfg)
    assert not (tmp_path / "out").exists()
