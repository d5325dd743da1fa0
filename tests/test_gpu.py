"""The same path in 4-bit on a CUDA device (skipped where there is none; CI has none)."""

import json
import math

import pytest
import torch

from conftest import make_config

pytestmark = pytest.mark.gpu


def test_nf4_train_on_cuda(tiny_base, pref_jsonl, tmp_path):
    import bitsandbytes as bnb

    from qsimpo.train import train

    run = train(make_config(tiny_base, pref_jsonl, tmp_path / "run", "--train.max_steps", "3"))
    model = run.trainer.model
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears and all(m.weight.device.type == "cuda" for m in linears)
    assert linears[0].compute_dtype in (torch.bfloat16, torch.float16)
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_fast_path_matches_plain_on_cuda(tiny_base):
    from qsimpo.config import LoraConfig, ModelConfig
    from qsimpo.model import add_lora, load_base
    from qsimpo.packing import PackedPairCollator, PlainPairCollator
    from qsimpo.trainer import pair_logps

    model = add_lora(load_base(ModelConfig(name_or_path=str(tiny_base), compute_dtype="float32"), "cuda:0"),
                     LoraConfig(r=4, alpha=8, dropout=0.0), True, False, 0)
    pairs = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13, 14]},
             {"prompt_ids": [1] + list(range(20, 60)), "chosen_ids": [9] * 30, "rejected_ids": [12]}]
    move = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    ref = pair_logps(model, move(PlainPairCollator(0)(pairs)), head_chunk_size=0)
    fast = pair_logps(model, move(PackedPairCollator(0)(pairs)), head_chunk_size=16)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
