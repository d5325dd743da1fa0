"""The demo on the real model: SmolLM2-135M-Instruct's NF4 base, both columns streaming real text at once."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2_gguf, tmp_path_factory):
    """A LoRA adapter on SmolLM2 whose weights are not the identity (no training needed to move the model),
    saved as `qsimpo train` saves one: adapter files and a qsimpo.json naming the base."""
    from qsimpo.config import LoraConfig, ModelConfig
    from qsimpo.realmodel import smollm2_path
    from qsimpo.train.model import add_lora, load_base

    base = str(smollm2_path("pypi"))
    model = add_lora(load_base(ModelConfig(name_or_path=base), "cpu"), LoraConfig(r=8, alpha=16, dropout=0.0), True, False, 0)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    out = tmp_path_factory.mktemp("smollm2") / "adapter"
    model.save_pretrained(out)
    (out / "qsimpo.json").write_text(json.dumps({"base_model": base, "quantization": "nf4", "simpo": {"beta": 2.5}}))
    return out


def test_both_columns_stream_real_text_at_once(smollm2_adapter):
    from qsimpo.demo.sides import Settings, SideBySide

    chat = SideBySide.load(str(smollm2_adapter))
    user = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = Settings(temperature=0, max_new_tokens=20)
    frames = list(chat.stream({"left": user, "right": user}, greedy))
    last = frames[-1]
    assert len(frames) >= 3 and all(set(f) == {"left", "right"} for f in frames)
    assert "Paris" in last["left"]  # the SFT model (adapter off) is the real instruct model
    assert last["right"] and last["right"] != last["left"]  # the adapter moves the answer
    assert last["left"] == chat.respond("left", user, greedy) and last["right"] == chat.respond("right", user, greedy)
    stats = chat.stats({"left": user, "right": user}, last)
    assert all(v["avg_logprob"]["left"] < 0 and v["tokens"] > 0 for v in stats.values())
