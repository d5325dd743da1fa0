"""Pairs -> the plain padded batch (the packed layouts are qsimpo.train.packing)."""

from __future__ import annotations

import torch

class PairCollator:
    """Pairs -> the plain batch: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, right-padded.

    response_mask is 1 exactly on response tokens (what SimPO scores), 0 on prompt and padding.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [(f["prompt_ids"], f[key]) for key in ("chosen_ids", "rejected_ids") for f in features]
        length = max(len(p) + len(r) for p, r in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        response_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, (prompt, response) in enumerate(seqs):
            n, m = len(prompt), len(response)
            input_ids[i, : n + m] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
            attention_mask[i, : n + m] = 1
            response_mask[i, n: n + m] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
