"""The fast paths compute the same numbers as the plain path.

Plain: separate chosen and rejected rows (prompt encoded twice), full [N, L, V] logits,
qsimpo.train.logprobs.sequence_logps. Fast: the response-only chunked head, shared-prompt packing,
and both together. Per-sequence average log-probs and the LoRA gradients of the SimPO loss
must match on batches with very different prompt and response lengths.
"""

import random

import pytest
import torch

from qsimpo.config import LoraConfig, ModelConfig
from qsimpo.data import PairCollator
from qsimpo.train.logprobs import sequence_logps
from qsimpo.train.losses import simpo_loss
from qsimpo.train.model import add_lora, load_base
from qsimpo.train.packing import PackedPairCollator, PlainPairCollator, attention_inputs
from qsimpo.response_logps import attn_implementation, pair_logps


def _avg_only(avg):
    """Average log-probs as the SequenceLogps SimPO reads (without its NLL term it reads ``avg`` only)."""
    from qsimpo.train.logprobs import SequenceLogps

    return SequenceLogps(avg, avg, torch.ones_like(avg))


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
    simpo_loss(*map(_avg_only, (chosen, rejected)), beta=2.0, gamma=0.5).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return chosen.detach(), rejected.detach(), grads


COLLATORS = {"plain": PlainPairCollator(0), "packed": PackedPairCollator(0), "one_row": PackedPairCollator(0, one_row=True)}


@pytest.mark.parametrize("layout, chunk", [("plain", 7), ("packed", 0), ("packed", 16), ("packed", 4096),
                                           ("one_row", 0), ("one_row", 16)])
def test_fast_paths_match_plain(model, layout, chunk):
    pairs = _pairs(model.config.vocab_size)
    ref_c, ref_r, ref_g = _loss_and_grads(model, lambda: _reference(model, pairs))
    collate = COLLATORS[layout]
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
    one_row = PackedPairCollator(0, one_row=True)(pairs)
    assert one_row["input_ids"].shape == (1, sum(lengths))  # padding-free: not one padded token
    assert (one_row["pair_doc"] >= 0).all()


def test_packed_mask_blocks_chosen_from_rejected():
    pair = {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 8], "rejected_ids": [9, 10, 11]}
    b = PackedPairCollator(0)([pair])
    allowed = attention_inputs(b, "sdpa", torch.float32)["attention_mask"][0, 0] == 0
    assert allowed[5:, 3:5].sum() == 0  # rejected rows never see chosen columns
    assert allowed[5:, :3].all()  # but see the whole prompt
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    # first rejected token (9, at index 5) is scored from the prompt's last position (2)
    idx, lab = b["score_index"].tolist(), b["score_labels"].tolist()
    assert list(zip(idx, lab)) == [(2, 7), (3, 8), (2, 9), (5, 10), (6, 11)]


def test_length_grouping_keeps_every_pair_in_one_order_per_epoch():
    from qsimpo.train.trainer import GlobalLengthGroupedSampler

    lengths = [random.Random(i).randrange(10, 1000) for i in range(97)]
    sampler = GlobalLengthGroupedSampler(8, lengths, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(97))
    assert list(GlobalLengthGroupedSampler(8, lengths, seed=3)) == first  # every process draws this order
    sampler.set_epoch(1)
    again = list(sampler)
    assert again != first and sorted(again) == list(range(97))


def test_one_row_keeps_pairs_apart():
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [7], "rejected_ids": [9, 10]},
             {"prompt_ids": [1], "chosen_ids": [3, 4], "rejected_ids": [6]}]
    b = PackedPairCollator(0, one_row=True)(pairs)
    allowed = attention_inputs(b, "sdpa", torch.float32)["attention_mask"][0, 0] == 0
    assert b["position_ids"][0].tolist() == [0, 1, 2, 2, 3, 0, 1, 2, 1]
    assert not allowed[5:, :5].any()  # the second pair never sees the first
    # second pair: prompt at 5, chosen at 6-7, rejected at 8 (sees the prompt and itself only)
    assert allowed[5:, 5:].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]


def test_flex_attention_block_mask_matches_dense_mask(model):
    """Padding-free packing under FlexAttention (a BlockMask from pair_mask) == the dense 4-D mask.

    Forward only: FlexAttention has no backward on the CPU (torch raises), so training under it
    runs on CUDA, where the gpu-marked test covers the gradients. This proves the block mask
    and the padding-free layout compute the plain path's numbers.
    """
    pairs = _pairs(model.config.vocab_size)
    model.eval()
    try:
        with torch.no_grad():
            ref_c, ref_r = _reference(model, pairs)
            model.set_attn_implementation("flex_attention")
            assert attn_implementation(model) == "flex_attention"
            c, r = pair_logps(model, PackedPairCollator(0, one_row=True)(pairs), head_chunk_size=16)
    finally:
        model.set_attn_implementation("sdpa")
        model.train()
    torch.testing.assert_close(c, ref_c, rtol=0, atol=2e-5)
    torch.testing.assert_close(r, ref_r, rtol=0, atol=2e-5)


@pytest.mark.parametrize("one_row, query_chunk", [(True, 128), (True, 2048), (False, 256)])
def test_tiled_block_mask_equals_torch_create_block_mask(one_row, query_chunk):
    """Our chunked BlockMask classifies every block exactly as torch's create_block_mask does."""
    from torch.nn.attention.flex_attention import create_block_mask

    from qsimpo.train.packing import flex_block_mask, pair_mask

    rng = random.Random(3)
    pairs = [{"prompt_ids": [1] * rng.randrange(1, 200), "chosen_ids": [2] * rng.randrange(1, 150),
              "rejected_ids": [3] * rng.randrange(1, 150)} for _ in range(4)]
    batch = PackedPairCollator(0, one_row=one_row)(pairs)
    doc, seg = batch["pair_doc"], batch["segment"]
    rows, width = doc.shape
    ours = flex_block_mask(doc, seg, query_chunk=query_chunk)
    ref = create_block_mask(lambda b, h, q, kv: pair_mask(doc, seg, b, q, kv), rows, None, width, width, device="cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks", "q_num_blocks", "full_q_num_blocks"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), msg=name)
    torch.testing.assert_close(ours.to_dense(), ref.to_dense())
    assert ours.sparsity() > 0  # blocks are really skipped (rejected→chosen, other pairs, padding)
