"""The same path in 4-bit on a CUDA device (skipped where there is none; CI has none)."""

import json
import math

import pytest
import torch

from conftest import make_config

pytestmark = pytest.mark.gpu


def _avg_only(avg):
    """Average log-probs as the SequenceLogps SimPO reads (without its NLL term it reads ``avg`` only)."""
    from qsimpo.train.logprobs import SequenceLogps

    return SequenceLogps(avg, avg, torch.ones_like(avg))


def test_nf4_train_on_cuda(tiny_base, pref_jsonl, tmp_path):
    import bitsandbytes as bnb

    from qsimpo.train.recipe import train

    run = train(make_config(tiny_base, pref_jsonl, tmp_path / "run", "--train.max_steps", "3"))
    model = run.trainer.model
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.device.type == "cuda" for m in linears)
    assert linears[0].compute_dtype in (torch.bfloat16, torch.float16)
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_fast_path_matches_plain_on_cuda(tiny_base):
    from qsimpo.config import LoraConfig, ModelConfig
    from qsimpo.train.model import add_lora, load_base
    from qsimpo.train.packing import PackedPairCollator, PlainPairCollator
    from qsimpo.response_logps import pair_logps

    model = add_lora(load_base(ModelConfig(name_or_path=str(tiny_base), compute_dtype="float32"), "cuda:0"),
                     LoraConfig(r=4, alpha=8, dropout=0.0), True, False, 0)
    pairs = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13, 14]},
             {"prompt_ids": [1] + list(range(20, 60)), "chosen_ids": [9] * 30, "rejected_ids": [12]}]
    move = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    ref = pair_logps(model, move(PlainPairCollator(0)(pairs)), head_chunk_size=0)
    fast = pair_logps(model, move(PackedPairCollator(0)(pairs)), head_chunk_size=16)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_flex_attention_training_matches_dense_on_cuda(tiny_base):
    """Padding-free packing under FlexAttention (forward and backward) == the dense-mask SDPA path."""
    from qsimpo.config import LoraConfig, ModelConfig
    from qsimpo.train.losses import simpo_loss
    from qsimpo.train.model import add_lora, load_base
    from qsimpo.train.packing import PackedPairCollator
    from qsimpo.response_logps import pair_logps

    model = add_lora(load_base(ModelConfig(name_or_path=str(tiny_base), compute_dtype="float32"), "cuda:0"),
                     LoraConfig(r=4, alpha=8, dropout=0.0), True, True, 0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.train()
    pairs = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13, 14]},
             {"prompt_ids": [1] + list(range(20, 60)), "chosen_ids": [9] * 30, "rejected_ids": [12]},
             {"prompt_ids": [1, 3], "chosen_ids": list(range(30, 200)), "rejected_ids": list(range(40, 90))}]

    def run(one_row):
        model.zero_grad()
        batch = {k: v.cuda() for k, v in PackedPairCollator(0, one_row=one_row)(pairs).items()}
        chosen, rejected = pair_logps(model, batch, head_chunk_size=64)
        simpo_loss(*map(_avg_only, (chosen, rejected)), beta=2.0, gamma=0.5).loss.backward()
        return chosen.detach(), rejected.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = run(one_row=False)
    model.set_attn_implementation("flex_attention")
    got = run(one_row=True)
    for a, b in zip(ref[:2], got[:2]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    for name, g in ref[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_unquantized_bf16_train_with_chunked_head_on_cuda(tiny_base, pref_jsonl, tmp_path):
    """No quantization, bf16 mixed precision: the bf16 head meets fp32 hidden states (accelerate's output cast)."""
    from qsimpo.train.recipe import train

    run = train(make_config(tiny_base, pref_jsonl, tmp_path / "run", "--train.max_steps", "2", "--model.quantization",
                            "none", "--model.compute_dtype", "bfloat16", "--train.head_chunk_size", "16"))
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
