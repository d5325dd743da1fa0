"""Log-prob masking: prompt excluded, padding excluded, average ≠ sum on unequal lengths."""

import pytest
import torch

from qsimpo.train.logprobs import sequence_logps




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


def _plain_head_logps(h, weight, bias, labels, softcap):
    """The reference: full logits, log_softmax, gather (autograd does the backward)."""
    z = torch.nn.functional.linear(h, weight, bias).float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_head_gradcheck(softcap):
    """The hand-written backward is the derivative of the forward (fp64, every input that can need a grad)."""
    from qsimpo.train.logprobs import _ChunkedHead

    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (7,))
    assert torch.autograd.gradcheck(lambda h, w, b: _ChunkedHead.apply(h, w, b, labels, softcap, 3), (h, w, b))


@pytest.mark.parametrize("dtype, softcap, chunk", [(torch.float32, None, 4), (torch.float32, 30.0, 1000),
                                                   (torch.bfloat16, None, 5), (torch.bfloat16, 30.0, 2)])
def test_chunked_head_matches_full_logits(dtype, softcap, chunk):
    """Chunked response-only head == full logits + log_softmax, in value and in the hidden-state gradient."""
    from qsimpo.train.logprobs import chunked_head_logps

    torch.manual_seed(0)
    n_pos, hidden, vocab = 23, 16, 97
    states = torch.randn(2, n_pos, hidden, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab, bias=False).to(dtype).requires_grad_(False)
    index = torch.tensor([0, 3, 4, 5, 20, 24, 25, 40, 41, 45])  # flat positions into [2 * n_pos]
    labels = torch.randint(0, vocab, (len(index),))
    seq = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 3, 3])
    out = chunked_head_logps(states, head, index, labels, seq, 4, chunk_size=chunk, softcap=softcap)
    (out.avg * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    got = states.grad.clone()
    states.grad = None
    ref_tok = _plain_head_logps(states.reshape(-1, hidden)[index], head.weight, None, labels, softcap)
    ref = torch.zeros(4).index_add(0, seq, ref_tok) / torch.bincount(seq)
    (ref * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.avg, ref.detach(), **tol)
    torch.testing.assert_close(got, states.grad, **tol)
    assert head.weight.grad is None  # a frozen head gets no weight gradient


def test_chunked_head_takes_fp32_hidden_states_with_a_bf16_head():
    """Mixed precision with an unquantized bf16 head: accelerate hands back fp32 hidden states."""
    from qsimpo.train.logprobs import chunked_head_logps

    torch.manual_seed(0)
    states = torch.randn(1, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16).requires_grad_(False)
    index, labels, seq = torch.arange(1, 9), torch.randint(0, 50, (8,)), torch.tensor([0] * 5 + [1] * 3)
    out = chunked_head_logps(states, head, index, labels, seq, 2, chunk_size=3, softcap=30.0)
    out.avg.sum().backward()
    assert states.grad is not None and states.grad.dtype == torch.float32
    ref_tok = _plain_head_logps(states.detach().reshape(-1, 16)[index].to(torch.bfloat16), head.weight, None, labels, 30.0)
    torch.testing.assert_close(out.avg, torch.zeros(2).index_add(0, seq, ref_tok) / torch.tensor([5.0, 3.0]))
