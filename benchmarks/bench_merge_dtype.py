"""How much of a trained adapter survives `qsimpo merge` in each dtype, on a real model.

    python benchmarks/bench_merge_dtype.py                  # SmolLM2-135M-Instruct (qsimpo.realmodel)
    python benchmarks/bench_merge_dtype.py --steps 40 --lr 1e-3 --record

Trains one adapter with `qsimpo train` (NF4 base, LoRA r=16 on all linear layers, SimPO) on the
tiny quickstart's short courteous-vs-rude pairs, with a learning rate high enough that the adapter
visibly moves its base, then merges it with `qsimpo.export.merge.merge` in bfloat16, float16 and float32
(dequantized NF4 base weights, verify on). For each it prints the verify report's numbers: mean KL
and top-1 agreement of the merged model to the adapter on its 4-bit base and to the unmerged adapter
on the dequantized base, the adapter's own effect (KL adapter on vs off) and the ratio verify gates
on; ``--record`` appends them as JSON rows to results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_adapter(base: str, out: Path, steps: int, lr: float, pairs: int) -> Path:
    from qsimpo.config import load_config
    from qsimpo.quickstart.tiny import TOPICS, make_pairs
    from qsimpo.train.recipe import train

    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(TOPICS, pairs, seed=0)))
    adapter = out / "adapter"
    cfg = load_config(None, [
        "--model.name_or_path", base, "--data.path", str(data), "--train.output_dir", str(adapter),
        "--data.max_length", "128", "--lora.r", "16", "--lora.alpha", "32", "--lora.dropout", "0.0",
        "--train.batch_size", "4", "--train.gradient_accumulation_steps", "1", "--train.learning_rate", str(lr),
        "--train.max_steps", str(steps), "--train.warmup_ratio", "0", "--train.lr_scheduler", "constant",
        "--train.save_steps", "100000", "--train.progress", "false",
    ])
    train(cfg)
    return adapter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base model folder or .gguf file (default: qsimpo.realmodel.smollm2_path())")
    p.add_argument("--adapter", help="an adapter to merge instead of training one")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--out", default="/tmp/qsimpo-merge-bench")
    p.add_argument("--record", action="store_true", help="append the rows to benchmarks/results.jsonl")
    args = p.parse_args()

    import bitsandbytes
    import peft
    import torch
    import transformers

    from qsimpo.config import load_config
    from qsimpo.export.merge import VerifyError, merge
    from qsimpo.realmodel import smollm2_path

    torch.set_num_threads(2)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = args.base or str(smollm2_path())
    t0 = time.time()
    adapter = Path(args.adapter) if args.adapter else train_adapter(base, out, args.steps, args.lr, args.pairs)
    train_s = time.time() - t0
    meta = json.loads((adapter / "qsimpo.json").read_text())
    run_cfg = load_config(adapter / "config.yaml")
    rows = []
    for dtype in ("bfloat16", "float16", "float32"):
        t0 = time.time()
        try:
            report = merge(str(adapter), out / f"merged-{dtype}", dtype=dtype, device="cpu", log=lambda *_: None).report
        except VerifyError as e:
            report = e.report
        r = report.to_dict()
        rows.append({"bench": "merge_dtype", "date": time.strftime("%Y-%m-%d"), "base": base, "adapter": str(adapter),
                     "steps": meta["global_step"], "lr": run_cfg.train.learning_rate, "lora_r": run_cfg.lora.r,
                     "dtype": dtype, "probes": report.probes,
                     "kl_merged_vs_adapter": r["four_bit"]["kl"], "top1_merged_vs_adapter": r["four_bit"]["top1"],
                     "kl_merged_vs_unmerged_deq": r["dequantized"]["kl"], "top1_merged_vs_unmerged_deq": r["dequantized"]["top1"],
                     "adapter_effect_kl": r["adapter_effect"]["kl"],
                     "adapter_effect_top1": r["adapter_effect"]["top1"], "ratio": r["ratio"], "passed": r["passed"],
                     "positions": r["four_bit"]["positions"], "merge_s": round(time.time() - t0, 1),
                     "train_s": round(train_s, 1),
                     "versions": {"python": platform.python_version(), "torch": torch.__version__, "gguf": version("gguf"),
                                  "transformers": transformers.__version__, "peft": peft.__version__,
                                  "bitsandbytes": bitsandbytes.__version__}})
    print(f"adapter {adapter}: {rows[0]['steps']} steps at lr {rows[0]['lr']:g}, probes: {rows[0]['probes']}")
    print(f"{'dtype':<9} {'KL to 4-bit adapter':>20} {'top-1':>7} {'KL to unmerged':>15} {'top-1':>7} "
          f"{'adapter effect':>15} {'ratio':>9} {'verify':>7}")
    for r in rows:
        print(f"{r['dtype']:<9} {r['kl_merged_vs_adapter']:>20.3g} {r['top1_merged_vs_adapter']:>7.2%} "
              f"{r['kl_merged_vs_unmerged_deq']:>15.3g} {r['top1_merged_vs_unmerged_deq']:>7.2%} "
              f"{r['adapter_effect_kl']:>15.3g} {r['ratio']:>9.3g} {'ok' if r['passed'] else 'FAILED':>7}")
    if not args.record:
        return
    with open(Path(__file__).with_name("results.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
