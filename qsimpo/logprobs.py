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
