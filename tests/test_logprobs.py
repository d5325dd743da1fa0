"""Log-prob masking: prompt excluded, padding excluded, average ≠ sum on unequal lengths."""

import pytest
import torch

from qsimpo.logprobs import sequence_logps




def test_prompt_and_padding_excluded():
    torch.manual_seed(0)
    n, length, vocab = 2, 7, 11
    logits = torch.randn(n, length, vocab, dtype=torch.float64)
    ids = torch.randint(0, vocab, (n, length))
    # seq 0: prompt 3 tokens, response 4 tokens; seq 1: prompt 2, response 2, then 3 padding
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]])
    out = sequence_logps(logits, ids, mask)
    lsm = logits.log_softmax(-1)
    expect0 = sum(lsm[0, t - 1, ids[0, t]] for t in range(3, 7))
    expect1 = sum(lsm[1, t - 1, ids[1, t]] for t in range(2, 4))
    assert out.sum.tolist() == pytest.approx([expect0.item(), expect1.item()])
    assert out.count.tolist() == [4, 2]
    assert out.avg.tolist() == pytest.approx([expect0.item() / 4, expect1.item() / 2])
    # changing prompt or padding tokens' own logits and ids changes nothing
    logits2, ids2 = logits.clone(), ids.clone()
    logits2[1, 4:] += 100.0
    ids2[1, 5:] = 0
    assert torch.equal(sequence_logps(logits2, ids2, mask).sum, out.sum)


def test_average_differs_from_sum_on_unequal_lengths():
    # uniform logits: every token has log-prob −log V. Sum scales with length; the average does not.
    vocab = 4
    logits = torch.zeros(2, 6, vocab)
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]])
    out = sequence_logps(logits, ids, mask)
    lv = torch.log(torch.tensor(4.0))
    assert out.sum.tolist() == pytest.approx([-5 * lv.item(), -lv.item()])
    assert out.avg.tolist() == pytest.approx([-lv.item(), -lv.item()])
    assert out.sum[0] != out.sum[1] and out.avg[0] == out.avg[1]


def test_fp32_even_for_bf16_logits():
    logits = torch.randn(1, 4, 8).to(torch.bfloat16)
    out = sequence_logps(logits, torch.zeros(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]))
    assert out.avg.dtype == torch.float32


def test_shape_checks_and_empty_responses():
    logits = torch.zeros(2, 5, 3)
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="expected logits"):
        sequence_logps(logits, ids[:, :4], torch.ones(2, 4))
    with pytest.raises(ValueError, match="no response tokens"):
        sequence_logps(logits, ids, torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="position 0"):
        sequence_logps(logits, ids, torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 0, 0]]))
