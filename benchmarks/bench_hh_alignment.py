"""Alignment on real data, measured: SmolLM2-135M-Instruct (NF4) + LoRA SimPO on HH-RLHF harmless.

    python benchmarks/bench_hh_alignment.py                      # 30 steps of 8 pairs, 100 held-out pairs
    python benchmarks/bench_hh_alignment.py --steps 5 --eval-rows 24 --generate 2     # a quick look

What it runs, in order:

1. Split. The HH-RLHF harmless-base pairs (implicit transcripts; default
   ``../shared/data/hh-rlhf-harmless/sample.jsonl`` beside the repository, or ``--data``) are split
   once with a fixed seed: ``--eval-rows`` pairs are held out, the rest are the training pool (in
   file order, optionally capped by ``--train-rows``). Both files are written to the output folder,
   so the held-out pairs are never seen in training.
2. Train. ``python -m qsimpo train`` on a config this script writes (``OUT/config.yaml``): base
   ``qsimpo.realmodel.smollm2_path()`` in NF4, LoRA r 16 on all linear layers, pure SimPO
   (β 2.5, γ/β 0.5), ``--steps`` optimizer steps of ``--batch`` pairs, truncation to
   ``--max-length`` tokens with at most ``--max-prompt-length`` prompt tokens, malformed rows
   (two in the sample have an empty response) skipped. Gradient checkpointing is off unless
   ``--checkpointing``: a 135M model's activations fit in memory, and recomputing them costs time.
3. Evaluate. ``python -m qsimpo eval`` on the held-out file: the same base scored with the adapter
   off (SFT) and on (aligned): reward accuracy, margins β·(avg log p(chosen) − avg log p(rejected)),
   Spearman ρ between response length and average log-probability, and greedy answers
   (temperature 0) of both models to the first ``--generate`` held-out prompts (every prompt of
   the harmless split is a red-teaming attempt).

Prints the eval table and the answers, and appends one JSON row (config, wall times, train pairs/s,
every number of eval.json but the per-pair lists, the answers) to ``--results``. RESULTS.md is
written by hand from that row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless/sample.jsonl"
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="SmolLM2-135M-Instruct NF4 + LoRA SimPO on HH-RLHF harmless: held-out reward "
                                "accuracy, margins, length correlation and greedy answers, SFT (adapter off) vs aligned.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF JSONL with chosen/rejected transcripts")
    p.add_argument("--out", type=Path, default=ROOT / "adapters" / "bench-hh",
                   help="output folder: split files, config.yaml, adapter/, eval/")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="preference pairs per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine schedule, 10%% warm-up)")
    p.add_argument("--beta", type=float, default=2.5, help="SimPO β")
    p.add_argument("--gamma-beta-ratio", type=float, default=0.5, help="SimPO γ/β")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    p.add_argument("--max-length", type=int, default=256, help="max tokens of prompt + response")
    p.add_argument("--max-prompt-length", type=int, default=192, help="prompt tokens kept when a pair is truncated")
    p.add_argument("--train-rows", type=int, default=None, help="read at most this many training rows (None: all not held out)")
    p.add_argument("--eval-rows", type=int, default=100, help="held-out pairs, scored by both models")
    p.add_argument("--generate", type=int, default=5, help="held-out prompts answered greedily by both models (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer")
    p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="gradient checkpointing (less memory, more compute)")
    p.add_argument("--seed", type=int, default=42, help="seed of the split and of training")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results_hh.jsonl"),
                   help="JSONL file the run's row is appended to ('' for none)")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "eval_rows", "max_new_tokens", "max_length", "max_prompt_length", "lora_r"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.generate < 0:
        p.error("--generate must be >= 0")
    if args.max_prompt_length >= args.max_length:
        p.error("--max-prompt-length must be < --max-length")
    return args


# ---------------------------------------------------------------------------------------------- split
def prompt_of(transcript: str) -> str:
    """An implicit row's prompt: the transcript up to and including its last 'Assistant:' turn marker."""
    cut = transcript.rfind(ASSISTANT)
    return transcript[:cut + len(ASSISTANT)] if cut >= 0 else transcript


def split(data: Path, out: Path, eval_rows: int, seed: int) -> dict:
    """Write train.jsonl and heldout.jsonl (both in file order); return counts and the prompt overlap."""
    lines = [line for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if eval_rows >= len(lines):
        sys.exit(f"--eval-rows {eval_rows} leaves no training rows: {data} has {len(lines)} rows")
    held = set(random.Random(seed).sample(range(len(lines)), eval_rows))
    train = [line for i, line in enumerate(lines) if i not in held]
    heldout = [line for i, line in enumerate(lines) if i in held]
    (out / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (out / "heldout.jsonl").write_text("\n".join(heldout) + "\n", encoding="utf-8")

    def prompts(rows):
        found = []
        for line in rows:
            try:
                found.append(prompt_of(json.loads(line).get("chosen") or ""))
            except (json.JSONDecodeError, AttributeError):
                found.append(None)
        return found

    train_prompts = set(prompts(train))
    shared = sum(p is not None and p in train_prompts for p in prompts(heldout))
    return {"rows": len(lines), "train_rows": len(train), "heldout_rows": len(heldout), "heldout_prompts_seen_in_train": shared}


# ------------------------------------------------------------------------------------------- commands
def run(cmd: list[str], log: Path) -> float:
    """Run a qsimpo command with its progress bars on this terminal; stop with its exit code if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=None, text=True)
        f.write(done.stdout)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.exit(f"{cmd[2:4]} failed with exit code {done.returncode} (its output: {log})")
    return time.perf_counter() - t0


def train_config(args, base: str, out: Path) -> dict:
    return {
        "model": {"name_or_path": base, "quantization": "nf4"},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"path": str(out / "train.jsonl"), "format": "implicit", "on_bad_row": "skip",
                 "max_length": args.max_length, "max_prompt_length": args.max_prompt_length, "max_rows": args.train_rows},
        "simpo": {"beta": args.beta, "gamma_beta_ratio": args.gamma_beta_ratio},
        "train": {"output_dir": str(out / "adapter"), "learning_rate": args.lr, "max_steps": args.steps,
                  "batch_size": args.batch, "gradient_accumulation_steps": 1, "lr_scheduler": "cosine",
                  "warmup_ratio": 0.1, "gradient_checkpointing": args.checkpointing, "logging_steps": 1,
                  "save_steps": args.steps + 1, "seed": args.seed, "overwrite": args.overwrite},
    }


def training_summary(adapter: Path, steps: int, batch: int) -> dict:
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [r for r in rows if "loss" in r and "rewards/accuracies" in r]
    final = next((r for r in reversed(rows) if "train_runtime" in r), {})
    runtime = final.get("train_runtime")

    def mean(key, part):
        vals = [r[key] for r in part if key in r]
        return sum(vals) / len(vals) if vals else None

    k = min(10, len(steps_logged))
    first, last = steps_logged[:k], steps_logged[-k:]
    meta = json.loads((adapter / "qsimpo.json").read_text())
    return {
        "steps": meta["global_step"], "pairs": meta["global_step"] * batch, "epoch": meta["epoch"],
        "train_runtime_s": runtime, "pairs_per_s": meta["global_step"] * batch / runtime if runtime else None,
        "data": meta["data"]["train"], "window": k,
        "first": {"loss": mean("loss", first), "accuracy": mean("rewards/accuracies", first),
                  "margin": mean("rewards/margins", first)},
        "last": {"loss": mean("loss", last), "accuracy": mean("rewards/accuracies", last),
                 "margin": mean("rewards/margins", last)},
        "versions": meta["versions"],
    }


# ---------------------------------------------------------------------------------------------- report
def last_turn(prompt: str) -> str:
    """The last human message of an HH transcript prompt."""
    cut = prompt.rfind(HUMAN.strip())
    text = prompt[cut + len(HUMAN.strip()):] if cut >= 0 else prompt
    return text.replace(ASSISTANT.strip(), "").strip()


def first_turn_of(answer: str) -> str:
    """A generated answer up to the point where the model starts writing the next 'Human:' turn itself."""
    cut = answer.find(HUMAN.strip())
    return (answer[:cut] if cut >= 0 else answer).strip()


def short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def rho(m: dict) -> str:
    s = m["length"]["spearman_length_logp"]
    return "n/a" if s["rho"] is None else f"{s['rho']:+.3f} (p {s['p_value']:.2g})"


def print_report(ev: dict, tr: dict, split_info: dict, wall: dict) -> None:
    sft, al = ev["models"]["sft"], ev["models"]["aligned"]
    print("\n" + "=" * 78)
    print(f"SmolLM2-135M-Instruct NF4 + LoRA SimPO on HH-RLHF harmless ({split_info['train_rows']} training rows, "
          f"{ev['data']['pairs']} held-out pairs)")
    print(f"training: {tr['steps']} steps x {tr['pairs'] // max(tr['steps'], 1)} pairs in {tr['train_runtime_s']:.0f} s "
          f"= {tr['pairs_per_s']:.3f} pairs/s, peak RSS {tr['peak_rss_gib']:.2f} GiB")
    print(f"wall: train {wall['train_s']:.0f} s, eval {wall['eval_s']:.0f} s, total {wall['total_s']:.0f} s")
    print(f"training batches, first vs last {tr['window']} steps: loss {tr['first']['loss']:.3f} -> {tr['last']['loss']:.3f}, "
          f"accuracy {tr['first']['accuracy']:.2f} -> {tr['last']['accuracy']:.2f}, "
          f"margin {tr['first']['margin']:+.3f} -> {tr['last']['margin']:+.3f}")
    rows = [
        ("reward accuracy", f"{sft['reward_accuracy']:.3f}", f"{al['reward_accuracy']:.3f}"),
        ("reward margin, mean", f"{sft['reward_margin_mean']:+.3f}", f"{al['reward_margin_mean']:+.3f}"),
        ("reward margin, median", f"{sft['reward_margin_median']:+.3f}", f"{al['reward_margin_median']:+.3f}"),
        ("avg log p, chosen", f"{sft['logp_chosen_mean']:.3f}", f"{al['logp_chosen_mean']:.3f}"),
        ("avg log p, rejected", f"{sft['logp_rejected_mean']:.3f}", f"{al['logp_rejected_mean']:.3f}"),
        ("SimPO loss", f"{sft['simpo_loss']:.3f}", f"{al['simpo_loss']:.3f}"),
        ("Spearman rho(length, avg log p)", rho(sft), rho(al)),
        ("reward favours the longer response", f"{sft['length']['prefers_longer']['rate']:.3f}",
         f"{al['length']['prefers_longer']['rate']:.3f}"),
    ]
    print(f"\n{'held-out':<38}{'SFT':>20}{'aligned':>20}")
    for label, a, b in rows:
        print(f"{label:<38}{a:>20}{b:>20}")
    g = ev.get("generation")
    if g:
        print(f"\ngreedy answers (max {g['max_new_tokens']} new tokens; cut where the model writes a 'Human:' turn):")
        for s in g["samples"]:
            print(f"\n  prompt : {short(last_turn(s['prompt']), 120)}")
            print(f"  SFT    : {short(first_turn_of(s['sft']))}")
            print(f"  aligned: {short(first_turn_of(s['aligned']))}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.data.is_file():
        sys.exit(f"HH-RLHF data not found: {args.data}\npass --data PATH to a JSONL file of chosen/rejected transcripts "
                 "(e.g. harmless-base from github.com/anthropics/hh-rlhf, unzipped)")
    out = args.out.resolve()
    if (out / "adapter" / "adapter_model.safetensors").exists() and not args.overwrite:
        sys.exit(f"{out} already holds a finished run: pass --overwrite to replace it, or --out another folder")
    if args.overwrite and (out / "eval").exists():
        shutil.rmtree(out / "eval")
    out.mkdir(parents=True, exist_ok=True)

    from qsimpo.realmodel import smollm2_path

    t_start = time.perf_counter()
    base = str(smollm2_path())
    split_info = split(args.data, out, args.eval_rows, args.seed)
    print(f"split {args.data}: {split_info['train_rows']} training rows, {split_info['heldout_rows']} held out "
          f"({split_info['heldout_prompts_seen_in_train']} held-out prompts also occur in training rows)")
    cfg = train_config(args, base, out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    wall = {"train_s": run([sys.executable, "-m", "qsimpo", "train", str(out / "config.yaml")], out / "train.log")}
    train_peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux
    tr = training_summary(out / "adapter", args.steps, args.batch)
    tr["peak_rss_gib"] = round(train_peak_gib, 2)
    eval_cmd = [sys.executable, "-m", "qsimpo", "eval", str(out / "adapter"), "--data", str(out / "heldout.jsonl"),
                "--out", str(out / "eval"), "--batch-size", str(args.batch)]
    if args.generate:
        eval_cmd += ["--generate", str(args.generate), "--temperature", "0", "--max-new-tokens", str(args.max_new_tokens)]
    wall["eval_s"] = run(eval_cmd, out / "eval.log")
    wall["total_s"] = time.perf_counter() - t_start
    ev = json.loads((out / "eval" / "eval.json").read_text())

    print_report(ev, tr, split_info, wall)
    if args.results:
        row = {
            "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "data": str(args.data), "split": split_info, "config": {k: v for k, v in cfg.items()},
            "wall_s": {k: round(v, 1) for k, v in wall.items()}, "training": tr,
            "eval": {k: ev[k] for k in ("data", "simpo", "models", "versions", "seconds")},
        }
        if ev.get("generation"):
            g = ev["generation"]
            row["eval"]["generation"] = {**{k: v for k, v in g.items() if k != "samples"},
                                         "samples": [{"location": s["location"], "last_turn": last_turn(s["prompt"]),
                                                      "sft": s["sft"], "aligned": s["aligned"]} for s in g["samples"]]}
        row["config"]["model"] = {**cfg["model"], "name_or_path": "smollm2_path()"}
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"\nappended to {args.results}")


if __name__ == "__main__":
    main()
