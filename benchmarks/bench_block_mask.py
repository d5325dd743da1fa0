"""Memory and time to build the FlexAttention block mask for one padding-free row of pairs.

    python benchmarks/bench_block_mask.py [--device cpu|cuda] [--pairs 4] [--pair-tokens 4096]

Compares qsimpo.train.packing.flex_block_mask (a chunk of query blocks at a time) with torch's
create_block_mask on the same pair_mask, each in its own process: peak RSS on the CPU,
torch.cuda.max_memory_allocated on CUDA. Both masks are checked equal block for block.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def build(which: str, device: str, pairs: int, pair_tokens: int) -> dict:
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from qsimpo.train.packing import PackedPairCollator, flex_block_mask, pair_mask

    third = pair_tokens // 3
    batch = PackedPairCollator(0, one_row=True)(
        [{"prompt_ids": [1] * (pair_tokens - 2 * third), "chosen_ids": [2] * third, "rejected_ids": [3] * third}] * pairs)
    doc, seg = batch["pair_doc"].to(device), batch["segment"].to(device)
    rows, width = doc.shape
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if which == "qsimpo":
        mask = flex_block_mask(doc, seg)
    else:
        mask = create_block_mask(lambda b, h, q, kv: pair_mask(doc, seg, b, q, kv), rows, None, width, width, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    return {"tool": which, "tokens": width, "seconds": time.perf_counter() - t0, "peak_gib": peak,
            "sparsity": mask.sparsity(), "kv_num_blocks": mask.kv_num_blocks.sum().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--pair-tokens", type=int, default=4096, help="prompt + chosen + rejected tokens per pair")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(build(args.one, args.device, args.pairs, args.pair_tokens)))
        return
    results = []
    for which in ("qsimpo", "torch"):
        out = subprocess.run([sys.executable, __file__, "--one", which, "--device", args.device, "--pairs", str(args.pairs),
                              "--pair-tokens", str(args.pair_tokens)], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            sys.exit(f"{which} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[0][7:]))
        r = results[-1]
        print(f"{which:6s} {r['tokens']} tokens: {r['seconds']:.2f} s, peak +{r['peak_gib']:.2f} GiB, "
              f"sparsity {r['sparsity']:.1f}%, {r['kv_num_blocks']} partial blocks")
    if results[0]["kv_num_blocks"] != results[1]["kv_num_blocks"]:
        sys.exit("the two masks differ")


if __name__ == "__main__":
    main()
