"""Score preference pairs with a model: per-response average log-probs and lengths.

Shared by the quickstart, ``qsimpo eval`` and in-training evaluation, so every reward
accuracy the kit reports is computed the same way as the training loss's rewards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .data import PairCollator
from .logprobs import sequence_logps


class PairScores(NamedTuple):
    chosen: torch.Tensor  # [N] average log-prob of each chosen response
    rejected: torch.Tensor  # [N] average log-prob of each rejected response
    chosen_len: torch.Tensor  # [N] response token counts
    rejected_len: torch.Tensor


@torch.no_grad()
def score_pairs(model, pairs: list[dict], pad_token_id: int, batch_size: int = 8, progress: bool = False) -> PairScores:
    """Average response log-probs of every pair under ``model`` (in eval mode, no grad)."""
    collate = PairCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {k: [] for k in PairScores._fields}
    batches = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    for i in batches:
        batch = collate(pairs[i : i + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        lp = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
        b = batch["input_ids"].shape[0] // 2
        out["chosen"].append(lp.avg[:b].float().cpu())
        out["rejected"].append(lp.avg[b:].float().cpu())
        out["chosen_len"].append(lp.count[:b].cpu())
        out["rejected_len"].append(lp.count[b:].cpu())
    model.train(was_training)
    return PairScores(*(torch.cat(out[k]) for k in PairScores._fields))


def reward_accuracy(scores: PairScores) -> float:
    """Fraction of pairs whose chosen response has the higher length-normalised log-likelihood."""
    return float((scores.chosen > scores.rejected).float().mean())
