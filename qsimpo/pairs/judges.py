"""What the model judges share: answers grouped into forward passes by the memory they take, and counts of what was cut.

A judge's forward pass over a batch of rows padded to length L holds activations roughly proportional to
rows x L (the MLP, the hidden states) plus rows x L^2 where attention scores are written out (DeBERTa's
disentangled attention always does). ``batches`` fills each pass up to a budget of such bytes, longest rows
first, so the first pass is the largest and a judge that does not fit fails at once, not an hour in.
"""

from __future__ import annotations

import torch

CPU_BUDGET = 1 << 30  # bytes of activations per pass on the CPU: past this, bigger passes are no faster
GPU_SHARE = 0.5  # of the memory free once the judge is loaded: leaves room for the allocator and fragmentation


def activation_bytes(config, length: int, dtype_bytes: int, eager_attention: bool) -> int:
    """Bytes one row of ``length`` tokens takes in a forward pass without gradients (a rule of thumb, not a promise)."""
    hidden = getattr(config, "hidden_size", 1024)
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", 16)
    linear = length * (6 * hidden + 3 * inter) * dtype_bytes
    # DeBERTa keeps content-to-content, content-to-position and position-to-content scores (3 x heads x L x L)
    quadratic = 3 * heads * length * length * 4 if eager_attention else 0
    return linear + quadratic


def budget(device: str) -> int:
    """Activation bytes a pass may take on ``device``."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_SHARE)
    return CPU_BUDGET


def batches(lengths: list[int], cost, limit: int, max_rows: int | None = None, equal_lengths: bool = False) -> list[list[int]]:
    """Indices of ``lengths`` in passes, longest first, each pass padded to its longest row costing at most ``limit``
    (``cost(rows, length)`` bytes); a row that alone costs more still gets a pass of its own. ``equal_lengths``: only
    rows of the same length share a pass (no padding, for models whose own code is not known to handle it)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out:
            last = out[-1]
            longest = lengths[last[0]]
            fits = cost(len(last) + 1, longest) <= limit and (max_rows is None or len(last) < max_rows)
            if fits and (not equal_lengths or lengths[i] == longest):
                last.append(i)
                continue
        out.append([i])
    return out


def groups(prompts: list, sizes: list[int] | None) -> list[range]:
    """The answers of each prompt as index ranges: ``sizes`` answers at a time, or (None) each run of equal prompts."""
    if sizes is None:
        sizes = []
        for i, p in enumerate(prompts):
            if i and p == prompts[i - 1]:
                sizes[-1] += 1
            else:
                sizes.append(1)
    if sum(sizes) != len(prompts):
        raise ValueError(f"group sizes {sizes} do not add up to the {len(prompts)} answers")
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out
