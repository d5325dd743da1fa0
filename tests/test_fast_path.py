"""The fast paths compute the same numbers as the plain path.

Plain: separate chosen and rejected rows (prompt encoded twice), full [N, L, V] logits,
qsimpo.logprobs.sequence_logps. Fast: the response-only chunked head, shared-prompt packing,
and both together. Per-sequence average log-probs and the LoRA gradients of the SimPO loss
must match on batches with very different prompt and response lengths.
"""

import random

import pytest
import torch

from qsimpo.config import LoraConfig, ModelConfig
from qsimpo.data import PairCollator
from qsimpo.logprobs import sequence_logps
from qsimpo.loss import simpo_loss
from qsimpo.model import add_lora, load_base
from qsimpo.packing import PackedPairCollator, PlainPairCollator
from qsimpo.trainer import pair_logps


def _pairs(vocab, seed=0):
    rng = random.Random(seed)
    shapes = [(3, 1, 40), (50, 7, 2), (12, 30, 31), (1, 5, 5), (25, 60, 9)]  # (prompt, chosen, rejected) lengths
    ids = lambda n: [rng.randrange(4, vocab) for _ in range(n)]  # noqa: E731
    return [{"prompt_ids": [1] + ids(p - 1), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in shapes]


@pytest.fixture(scope="module")
def model(tiny_base):
    m = load_base(ModelConfig(name_or_path=str(tiny_base), quantization="nf4"), "cpu")
    m = add_lora(m, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=True, gradient_checkpointing=True, seed=0)
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # not the identity: B = 0 would hide errors in the LoRA path
            p.data.normal_(0, 0.05)
    m.train()
    return m


def _reference(model, pairs):
    batch = PairCollator(0)(pairs)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    avg = sequence_logps(logits, batch["input_ids"], batch["response_mask"]).avg
    return avg[: len(pairs)], avg[len(pairs):]


def _loss_and_grads(model, logps_fn):
    model.zero_grad()
    chosen, rejected = logps_fn()
    simpo_loss(chosen, rejected, beta=2.0, gamma=0.5).losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return chosen.detach(), rejected.detach(), grads


@pytest.mark.parametrize("layout, chunk", [("plain", 7), ("packed", 0), ("packed", 16), ("packed", 4096)])
def test_fast_paths_match_plain(model, layout, chunk):
    pairs = _pairs(model.config.vocab_size)
    ref_c, ref_r, ref_g = _loss_and_grads(model, lambda: _reference(model, pairs))
    collate = PackedPairCollator(0) if layout == "packed" else PlainPairCollator(0)
    batch = collate(pairs)
    c, r, g = _loss_and_grads(model, lambda: pair_logps(model, batch, head_chunk_size=chunk))
    torch.testing.assert_close(c, ref_c, rtol=0, atol=2e-5)
    torch.testing.assert_close(r, ref_r, rtol=0, atol=2e-5)
    assert len(g) == len(ref_g) > 0
    for name in ref_g:
        assert ref_g[name].abs().sum() > 0, f"{name}: zero gradient in the reference"
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packing_saves_the_second_prompt():
    pairs = _pairs(100)
    plain, packed = PairCollator(0)(pairs), PackedPairCollator(0)(pairs)
    real_plain = int(plain["attention_mask"].sum())
    lengths = [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs]
    assert real_plain - sum(lengths) == sum(len(p["prompt_ids"]) for p in pairs)
    assert packed["input_ids"].shape == (5, max(lengths))


def test_packed_mask_blocks_chosen_from_rejected():
    pair = {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10, 11]}
    b = PackedPairCollator(0)([pair])
    allowed = b["attention_mask"][0, 0] == 0
    assert allowed[5:, 3:5].sum() == 0  # rejected rows never see chosen columns
    assert allowed[5:, :3].all()  # but see the whole prompt
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    # first rejected token (9, at index 5) is scored from the prompt's last position (2)
    idx, lab = b["score_index"].tolist(), b["score_labels"].tolist()
    assert list(zip(idx, lab)) == [(2, 7), (3, 8), (2, 9), (5, 10), (6, 11)]


def test_length_grouping_keeps_every_pair():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [random.Random(i).randrange(10, 1000) for i in range(97)]
    order = list(LengthGroupedSampler(8, lengths=lengths))
    assert sorted(order) == list(range(97))
