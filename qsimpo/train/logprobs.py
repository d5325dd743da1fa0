"""Per-sequence response log-probs: the one place that shifts, masks and averages.

A batch holds token ids ``input_ids[N, L]`` and ``response_mask[N, L]`` that is 1 exactly on
response tokens (never on prompt or padding). The logit at position t predicts the token at
t+1, so the mask is shifted with the labels. SimPO uses the *average* over response tokens;
the sum is returned too (the count of response tokens is |y| in the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


HEAD_BLOCK_BYTES = 256 * 2**20  # the chunked head's fp32 [rows, vocab] block, whatever the vocabulary


def head_chunk_rows(chunk_size: int | None, vocab_size: int) -> int:
    """Rows of the chunked head's block: ``train.head_chunk_size`` as given (0: full logits), or for None
    as many as keep the fp32 block within HEAD_BLOCK_BYTES (2048 rows at 32k tokens, 512 at Llama-3's
    128k, 256 at Gemma's 256k), so a larger vocabulary never means a larger peak."""
    if chunk_size is not None:
        return chunk_size
    return max(16, HEAD_BLOCK_BYTES // (4 * vocab_size) // 16 * 16)


class SequenceLogps(NamedTuple):
    avg: torch.Tensor  # [N] mean log-prob over response tokens
    sum: torch.Tensor  # [N] summed log-prob over response tokens
    count: torch.Tensor  # [N] number of response tokens


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, in fp32 whatever the logits' dtype."""
    n, l, v = logits.shape
    flat = F.cross_entropy(logits.reshape(-1, v).float(), labels.reshape(-1), reduction="none")
    return -flat.view(n, l)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> SequenceLogps:
    """Sum and average of log π(response token | everything before it), per sequence."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or input_ids.shape != response_mask.shape:
        raise ValueError(
            f"expected logits [N, L, V] with input_ids and response_mask [N, L]; got logits {tuple(logits.shape)}, "
            f"input_ids {tuple(input_ids.shape)}, response_mask {tuple(response_mask.shape)}"
        )
    labels = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(torch.float32)
    if bool(response_mask[:, 0].any()):
        raise ValueError("response_mask marks position 0: a response token needs at least one token before it")
    count = mask.sum(-1)
    if bool((count == 0).any()):
        raise ValueError(f"sequences {torch.nonzero(count == 0).flatten().tolist()} have no response tokens")
    per_token = token_logps(logits[:, :-1], labels.masked_fill(mask == 0, 0)) * mask
    total = per_token.sum(-1)
    return SequenceLogps(total / count, total, count)


def _logps_of(logits: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def per_sequence(token_logps: torch.Tensor, score_seq: torch.Tensor, n_seqs: int) -> SequenceLogps:
    """Sum/average token log-probs into their sequences (index_add: one pass, any layout)."""
    total = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device).index_add(0, score_seq, token_logps)
    count = torch.zeros(n_seqs, dtype=torch.float32, device=token_logps.device).index_add(
        0, score_seq, torch.ones_like(token_logps))
    if bool((count == 0).any()):
        raise ValueError(f"sequences {torch.nonzero(count == 0).flatten().tolist()} have no response tokens")
    return SequenceLogps(total / count, total, count)


def indexed_logps(logits: torch.Tensor, score_index, score_labels, score_seq, n_seqs: int) -> SequenceLogps:
    """Response log-probs from the model's full logits [N, L, V] (already soft-capped) at the scored positions."""
    flat = logits.reshape(-1, logits.shape[-1])[score_index]
    return per_sequence(_logps_of(flat, score_labels, None), score_seq, n_seqs)


class _ChunkedHead(torch.autograd.Function):
    """log softmax(head(h))[label] per row, one [chunk, vocab] block of logits alive at a time.

    Forward keeps only each row's log-sum-exp; backward recomputes the chunk's logits and turns
    them into the softmax in place, so the head's working set is one fp32 block (plus its
    compute-dtype matmul output) instead of the three or four blocks autograd would hold for
    logits → log-softmax → gather. d/dlogit of log p(label) is onehot(label) − softmax.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, softcap, chunk_size):
        n, acc = h.shape[0], _acc_dtype(h)
        out = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty(n, dtype=acc, device=h.device)
        rows = torch.arange(n, device=h.device)
        for s in range(0, n, chunk_size):
            z = _capped_logits(h[s:s + chunk_size], weight, bias, softcap, keep_tanh=False)[0]
            target = z[rows[: z.shape[0]], labels[s:s + chunk_size]]
            top = z.amax(-1)
            lse[s:s + chunk_size] = top + z.sub_(top[:, None]).exp_().sum(-1).log_()
            out[s:s + chunk_size] = target - lse[s:s + chunk_size]
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.softcap, ctx.chunk_size = softcap, chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        acc = _acc_dtype(h)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        rows = torch.arange(h.shape[0], device=h.device)
        cs = ctx.chunk_size
        for s in range(0, h.shape[0], cs):
            hs, g = h[s:s + cs], grad_out[s:s + cs].to(lse.dtype)
            z, tanh = _capped_logits(hs, weight, bias, ctx.softcap, keep_tanh=True)
            dz = z.sub_(lse[s:s + cs, None]).exp_().mul_(-g[:, None])  # −g·softmax, in place
            dz[rows[: dz.shape[0]], labels[s:s + cs]] += g  # + g·onehot(label)
            if tanh is not None:  # z = c·tanh(x/c): dz/dx = 1 − tanh²
                dz.mul_(tanh.square_().neg_().add_(1))
                del tanh
            dz = dz.to(h.dtype)
            if need_h:
                grad_h[s:s + cs] = dz @ weight.to(h.dtype)
            if need_w:
                grad_w.addmm_(dz.t().to(acc), hs.to(acc))
            if need_b:
                grad_b += dz.to(acc).sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


def _acc_dtype(h: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 activations (fp64 stays fp64, for gradcheck)."""
    return torch.promote_types(h.dtype, torch.float32)


def _capped_logits(h, weight, bias, softcap, keep_tanh: bool):
    """Logits of a chunk in the accumulation dtype, soft-capped if the model caps them.

    With ``keep_tanh`` (backward: d cap/dx = 1 − tanh²) the tanh comes back as a second block;
    without it the cap is applied in place, so the forward holds one block either way.
    """
    z = torch.nn.functional.linear(h, weight, bias).to(_acc_dtype(h))
    if not softcap:
        return z, None
    tanh = z.div_(softcap).tanh_()
    if not keep_tanh:
        return tanh.mul_(softcap), None
    return tanh * softcap, tanh


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, score_index, score_labels,
                        chunk_size: int = 1024, softcap: float | None = None) -> torch.Tensor:
    """log p(label) [T] at the scored positions of final hidden states [N, L, H], given the head's weight and bias.

    The head runs on ``chunk_size`` positions at a time with an fp32 log-sum-exp, and each
    chunk's logits are recomputed in the backward pass instead of stored (``_ChunkedHead``), so
    peak memory for the head is one [chunk, vocab] block whatever the batch, length or
    vocabulary. A frozen head gets no weight gradient, only the hidden states do.
    """
    # the head's dtype: under mixed precision an unquantized bf16 head can meet fp32 hidden states
    h = hidden.reshape(-1, hidden.shape[-1])[score_index].to(weight.dtype)
    return _ChunkedHead.apply(h, weight, bias, score_labels, softcap, chunk_size)


def chunked_head_logps(hidden: torch.Tensor, head: torch.nn.Linear, score_index, score_labels, score_seq, n_seqs: int,
                       chunk_size: int = 1024, softcap: float | None = None) -> SequenceLogps:
    """Response log-probs from final hidden states, the head applied only where scored (``chunked_token_logps``)."""
    token = chunked_token_logps(hidden, head.weight, head.bias, score_index, score_labels, chunk_size, softcap)
    return per_sequence(token, score_seq, n_seqs)
