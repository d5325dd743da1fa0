"""Shared-prompt packing: one row per preference pair, ``[prompt | chosen | rejected]``.

The prompt is encoded once instead of twice. The attention mask (``pair_mask``) keeps the two
responses apart (rejected tokens cannot see chosen ones) and position ids restart after the
prompt, so each response sees exactly what it would see in its own ``prompt + response``
sequence. The first rejected token is scored from the prompt's last position, not from the
chosen tail. Under FlexAttention the pairs of a batch also share one row with no padding.

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


PROMPT, CHOSEN, REJECTED = 0, 1, 2


def pair_mask(doc: torch.Tensor, seg: torch.Tensor, b, q, kv) -> torch.Tensor:
    """May query ``q`` of row ``b`` attend to key ``kv``? The one definition of the packed mask.

    Same pair (``doc``; padding is doc −1 and sees only padding), causal, and a rejected token
    never sees a chosen one. Written as a FlexAttention ``mask_mod`` (b, h, q, kv: index tensors),
    which also evaluates on broadcast index grids for the dense mask, so both attention paths
    read the same rule.
    """
    return (doc[b, q] == doc[b, kv]) & (kv <= q) & ~((seg[b, q] == REJECTED) & (seg[b, kv] == CHOSEN))


def allowed_grid(doc: torch.Tensor, seg: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``pair_mask`` for every row and every (query in ``q``, key in ``kv``): bool [rows, len(q), len(kv)]."""
    rows = torch.arange(doc.shape[0], device=doc.device)[:, None, None]
    return pair_mask(doc, seg, rows, q[None, :, None], kv[None, None, :])


class PackedPairCollator:
    """Pairs → packed rows ``[prompt | chosen | rejected]`` with restarted positions (see above).

    ``one_row=False``: one row per pair, padded to the longest. ``one_row=True`` (padding-free,
    for FlexAttention, whose block mask skips what ``pair_mask`` forbids): every pair of the
    batch back to back in a single row, no padding at all. Either way the batch carries the mask
    as two compact per-token tensors (``pair_doc``, ``segment``); ``attention_inputs`` turns them
    into the mask the model's attention kernel takes, on the model's device.
    """

    def __init__(self, pad_token_id: int, one_row: bool = False):
        self.pad_token_id = pad_token_id
        self.one_row = one_row

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        b = len(features)
        lengths = [len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features]
        rows, width = (1, sum(lengths)) if self.one_row else (b, max(lengths))
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((rows, width), dtype=torch.long)
        doc = torch.full((rows, width), -1, dtype=torch.long)
        seg = torch.full((rows, width), -1, dtype=torch.long)
        index, labels, seq = [], [], []
        offset = 0
        for i, f in enumerate(features):
            p, c, r = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
            np_, nc, nr = len(p), len(c), len(r)
            row, start = (0, offset) if self.one_row else (i, 0)
            span = slice(start, start + np_ + nc + nr)
            input_ids[row, span] = torch.tensor(p + c + r)
            position_ids[row, span] = torch.cat([torch.arange(np_ + nc), torch.arange(np_, np_ + nr)])
            doc[row, span] = i
            seg[row, span] = torch.tensor([PROMPT] * np_ + [CHOSEN] * nc + [REJECTED] * nr)
            base = row * width + start
            # chosen token k (at np_+k) is predicted from np_+k-1
            index += [base + np_ - 1 + k for k in range(nc)]
            labels += c
            seq += [i] * nc
            # rejected token k (at np_+nc+k): the first from the prompt's last position
            index += [base + np_ - 1] + [base + np_ + nc + k - 1 for k in range(1, nr)]
            labels += r
            seq += [b + i] * nr
            offset += lengths[i]
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "pair_doc": doc,
            "segment": seg,
            "score_index": torch.tensor(index),
            "score_labels": torch.tensor(labels),
            "score_seq": torch.tensor(seq),
            "num_pairs": torch.tensor(b),
            **reference_tensors(features),
        }


def flex_block_mask(doc: torch.Tensor, seg: torch.Tensor, block_size: int = 128, query_chunk: int = 2048):
    """``pair_mask`` as a FlexAttention ``BlockMask``, built ``query_chunk`` queries at a time.

    torch's ``create_block_mask`` evaluates the mask on the whole [Q, KV] grid at once: for one
    padding-free row of 4 × 4096 tokens that is 268M cells with int64 intermediates, gigabytes
    on the GPU. Here each chunk of query blocks is classified against all key blocks (skipped:
    nothing allowed; full: everything allowed, no mask_mod call; partial: mask_mod decides),
    so memory stays at [query_chunk, KV]. Positions past the row's end are never allowed.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows, width = doc.shape
    n_blocks = -(-width // block_size)
    pad = n_blocks * block_size - width
    doc_p = torch.nn.functional.pad(doc, (0, pad), value=-2)  # the padded tail matches no pair
    seg_p = torch.nn.functional.pad(seg, (0, pad), value=-1)
    idx = torch.arange(n_blocks * block_size, device=doc.device)
    step = max(1, query_chunk // block_size) * block_size  # whole query blocks per chunk
    partial, full = [], []
    for start in range(0, len(idx), step):
        q = idx[start:start + step]
        allowed = allowed_grid(doc_p, seg_p, q, idx) & (idx < width)
        allowed &= (q < width)[None, :, None]
        tiles = allowed.view(rows, -1, block_size, n_blocks, block_size)
        some, every = tiles.any(4).any(2), tiles.all(4).all(2)
        partial.append(some & ~every)
        full.append(every)

    def ordered(blocks):  # [rows, 1, q_blocks, kv_blocks] bool → counts and block indices, allowed first
        blocks = torch.cat(blocks, 1)[:, None].to(torch.int32)
        return (blocks.sum(-1, dtype=torch.int32),
                torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32))

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size,
                                    mask_mod=lambda b, h, q, kv: pair_mask(doc_p, seg_p, b, q, kv),
                                    seq_lengths=(width, width))


def attention_inputs(batch: dict, attn_implementation: str, dtype: torch.dtype) -> dict:
    """The model's ``attention_mask`` (and ``position_ids``) for a batch of either layout.

    Plain rows: the 2-D padding mask as is. Packed rows: a FlexAttention ``BlockMask`` for
    ``flex_attention``, else (SDPA, eager) the dense 4-D additive mask in the compute dtype.
    """
    if "pair_doc" not in batch:
        return {"attention_mask": batch["attention_mask"]}
    doc, seg = batch["pair_doc"], batch["segment"]
    rows, width = doc.shape
    if attn_implementation == "flex_attention":
        mask = flex_block_mask(doc, seg)
    else:
        grid = torch.arange(width, device=doc.device)
        allowed = allowed_grid(doc, seg, grid, grid)
        mask = torch.zeros((rows, 1, width, width), dtype=dtype, device=doc.device)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"attention_mask": mask, "position_ids": batch["position_ids"]}


class PlainPairCollator:
    """The plain layout (``qsimpo.data.PairCollator``) plus the score_* tensors."""

    def __init__(self, pad_token_id: int):
        from qsimpo.data import PairCollator

        self.collate = PairCollator(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collate(features)
        batch.update(plain_score_tensors(batch["input_ids"], batch["response_mask"]))
        batch["num_pairs"] = torch.tensor(len(features))
        batch.update(reference_tensors(features))
        return batch


def reference_tensors(features: list[dict]) -> dict[str, torch.Tensor]:
    """The pairs' stored reference log-probs (DPO: summed, base with the adapter off), when the dataset carries them."""
    if "ref_chosen" not in features[0]:
        return {}
    return {key: torch.tensor([f[key] for f in features], dtype=torch.float32) for key in ("ref_chosen", "ref_rejected")}


def make_collator(packing: str, pad_token_id: int, attn_implementation: str = "sdpa"):
    """The training collator: packed rows (all in one padding-free row under FlexAttention) or plain rows."""
    if packing != "shared_prompt":
        return PlainPairCollator(pad_token_id)
    return PackedPairCollator(pad_token_id, one_row=attn_implementation == "flex_attention")
