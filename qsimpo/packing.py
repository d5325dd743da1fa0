"""Shared-prompt packing: one row per preference pair, ``[prompt | chosen | rejected]``.

The prompt is encoded once instead of twice. A 4-D attention mask keeps the two responses
apart (rejected tokens cannot see chosen ones) and position ids restart after the prompt, so
each response sees exactly what it would see in its own ``prompt + response`` sequence. The
first rejected token is scored from the prompt's last position, not from the chosen tail.

Both layouts describe what to score the same way (``score_*`` tensors), so the log-prob code
does not care which one built the batch:
    score_index  [T] flat position (row * L + t) whose hidden state predicts the token
    score_labels [T] the token predicted
    score_seq    [T] which sequence it belongs to: pair i's chosen is i, its rejected is B + i
"""

from __future__ import annotations

import torch


def plain_score_tensors(input_ids: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """score_* for the plain layout (chosen rows then rejected rows): position t−1 predicts token t."""
    n, length = input_ids.shape
    rows, cols = torch.nonzero(response_mask[:, 1:], as_tuple=True)
    cols = cols + 1  # target positions
    return {
        "score_index": rows * length + cols - 1,
        "score_labels": input_ids[rows, cols],
        "score_seq": rows,
    }


class PackedPairCollator:
    """Pairs → one packed row each, with the block mask and restarted positions described above."""

    def __init__(self, pad_token_id: int, mask_dtype: torch.dtype = torch.float32):
        self.pad_token_id = pad_token_id
        self.mask_dtype = mask_dtype

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        b = len(features)
        lengths = [len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features]
        width = max(lengths)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((b, width), dtype=torch.long)
        allowed = torch.zeros((b, width, width), dtype=torch.bool)
        index, labels, seq = [], [], []
        for i, f in enumerate(features):
            p, c, r = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
            np_, nc, nr = len(p), len(c), len(r)
            input_ids[i, : np_ + nc + nr] = torch.tensor(p + c + r)
            position_ids[i, :np_ + nc] = torch.arange(np_ + nc)
            position_ids[i, np_ + nc: np_ + nc + nr] = torch.arange(np_, np_ + nr)
            causal = torch.ones(np_ + nc + nr, np_ + nc + nr, dtype=torch.bool).tril()
            causal[np_ + nc:, np_: np_ + nc] = False  # rejected never sees chosen
            allowed[i, : np_ + nc + nr, : np_ + nc + nr] = causal
            pad = torch.arange(np_ + nc + nr, width)
            allowed[i, pad, pad] = True  # padding attends to itself only (no all-masked rows → no NaN)
            base = i * width
            # chosen token k (at np_+k) is predicted from np_+k-1
            index += [base + np_ - 1 + k for k in range(nc)]
            labels += c
            seq += [i] * nc
            # rejected token k (at np_+nc+k): the first from the prompt's last position
            index += [base + np_ - 1] + [base + np_ + nc + k - 1 for k in range(1, nr)]
            labels += r
            seq += [b + i] * nr
        mask = torch.zeros((b, 1, width, width), dtype=self.mask_dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.mask_dtype).min)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": position_ids,
            "score_index": torch.tensor(index),
            "score_labels": torch.tensor(labels),
            "score_seq": torch.tensor(seq),
            "num_pairs": torch.tensor(b),
        }


class PlainPairCollator:
    """The plain layout (``qsimpo.data.PairCollator``) plus the score_* tensors."""

    def __init__(self, pad_token_id: int):
        from .data import PairCollator

        self.collate = PairCollator(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        batch.update(plain_score_tensors(batch["input_ids"], batch["response_mask"]))
        batch["num_pairs"] = torch.tensor(len(features))
        return batch


def make_collator(packing: str, pad_token_id: int):
    return PackedPairCollator(pad_token_id) if packing == "shared_prompt" else PlainPairCollator(pad_token_id)
