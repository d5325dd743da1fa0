"""Llama 3.1/3.2's rope scaling in a GGUF file: llama.cpp's rope_freqs tensor, one factor per rotary pair.

The factors must be the ones transformers' own llama3 rope computes (its inverse frequencies are the
default ones divided by them), the merged file must pass the read-back check with them applied (and fail
without), and the adapter GGUF is written for such a base as for any Llama. llama.cpp itself runs such a
file in tests/export/test_gguf_llamacpp.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_adapter
from tiny_archs import tiny_base_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rope_factors_are_transformers_llama3_rope():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from qsimpo.export.gguf_arch import rope_factors

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    factors = torch.from_numpy(rope_factors(config))
    assert factors.shape == (64,) and factors.min() == 1.0 and factors.max() == 8.0
    assert 1.0 < float(factors[40]) or 1.0 < float(factors[45])  # some pairs are smoothed between 1 and 8
    torch.testing.assert_close(default / factors, scaled, rtol=1e-5, atol=0)
    assert rope_factors(LlamaConfig(hidden_size=64, num_attention_heads=4)) is None


def test_merged_llama31_file_passes_the_read_back_check_with_its_factors(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from qsimpo.export.gguf_check import apply_rope_freqs
    from qsimpo.export.merge import merge
    from qsimpo.export.verify import agreement, next_token_logprobs

    base = tiny_base_of("llama31", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=3)
    out = tmp_path / "merged"
    merge(str(adapter), out, device="cpu", log=lambda *_: None, gguf=["f16", "lora"])
    record = json.loads((out / "gguf" / "merged-F16.json").read_text())
    assert record["check"]["passed"] and record["check"]["greedy_match"]
    path = out / "gguf" / "merged-F16.gguf"
    assert "rope_freqs.weight" in {t.name for t in GGUFReader(path).tensors}
    assert json.loads((out / "gguf" / "merged-LoRA-F32.json").read_text())["check"]["passed"]

    # without the factors, what transformers reads back is another model: the check would have failed
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file=path.name, dtype=torch.float32).eval()
    probes = [list(range(3, 40))]
    without = agreement(next_token_logprobs(merged, probes), next_token_logprobs(plain, probes))
    apply_rope_freqs(plain, path)
    with_ = agreement(next_token_logprobs(merged, probes), next_token_logprobs(plain, probes))
    assert with_.kl < 1e-3 < without.kl
