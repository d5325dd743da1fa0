"""Score preference pairs with a model the way training scores them: per-response average log-probs and lengths.

``qsimpo eval``, the quickstart and the demo call ``score_pairs``; it batches the pairs with the
training collator (shared-prompt packed rows) and runs ``trainer.pair_logps``, the function the
SimPO loss is computed from, with the response-only chunked head. So every reward accuracy the kit
reports is computed as the training rewards are, and no full-vocabulary logits are ever built: a
model that trains can be evaluated in the same memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qsimpo.train.logprobs import head_chunk_rows
from qsimpo.train.packing import make_collator
from qsimpo.train.trainer import attn_implementation, pair_logps, unwrap


class PairScores(NamedTuple):
    chosen: torch.Tensor  # [N] average log-prob of each chosen response
    rejected: torch.Tensor  # [N] average log-prob of each rejected response
    chosen_len: torch.Tensor  # [N] response token counts
    rejected_len: torch.Tensor


@torch.no_grad()
def score_pairs(model, pairs, pad_token_id: int, batch_size: int = 8, progress: bool = False,
                head_chunk_size: int | None = None, adapter_names: list[str] | None = None) -> PairScores:
    """Average response log-probs of every pair under ``model`` (in eval mode, no grad).

    ``head_chunk_size`` as ``train.head_chunk_size`` (None: sized by the vocabulary). ``adapter_names``
    (one per pair) selects a peft adapter per row, "__base__" for none.
    """
    lm = unwrap(model)
    collate = make_collator("shared_prompt", pad_token_id, attn_implementation(model))
    chunk = head_chunk_rows(head_chunk_size, lm.config.vocab_size)
    dtype = lm.get_input_embeddings().weight.dtype
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {k: [] for k in PairScores._fields}
    batches = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    try:
        for i in batches:
            chunk_pairs = pairs[i : i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk_pairs).items()}
            extra = {"adapter_names": adapter_names[i : i + batch_size]} if adapter_names is not None else {}
            chosen, rejected = pair_logps(model, batch, chunk, dtype, **extra)
            out["chosen"].append(chosen.float().cpu())
            out["rejected"].append(rejected.float().cpu())
            out["chosen_len"].append(torch.tensor([len(p["chosen_ids"]) for p in chunk_pairs]))
            out["rejected_len"].append(torch.tensor([len(p["rejected_ids"]) for p in chunk_pairs]))
    finally:
        model.train(was_training)
    return PairScores(*(torch.cat(out[k]) for k in PairScores._fields))
