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


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor, softcap) -> torch.Tensor:
    return _logps_of(torch.nn.functional.linear(hidden, weight, bias), labels, softcap)


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


def chunked_head_logps(hidden: torch.Tensor, head: torch.nn.Linear, score_index, score_labels, score_seq, n_seqs: int,
                       chunk_size: int = 1024, softcap: float | None = None) -> SequenceLogps:
    """Response log-probs from final hidden states, applying the output head only where scored.

    The head runs on ``chunk_size`` positions at a time with an fp32 log-sum-exp, and each
    chunk's logits are recomputed in the backward pass instead of stored, so peak memory for the
    head is one [chunk, vocab] block whatever the batch, length or vocabulary. A frozen head
    gets no weight gradient (autograd skips it), only the hidden states do.
    """
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])[score_index]
    parts = []
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        parts.append(checkpoint(_chunk_logps, h[sl], head.weight, head.bias, score_labels[sl], softcap,
                                use_reentrant=False))
    return per_sequence(torch.cat(parts), score_seq, n_seqs)
