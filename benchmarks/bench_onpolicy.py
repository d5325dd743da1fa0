"""On-policy SimPO rounds, measured: `qsimpo pairs` -> `qsimpo train` -> `qsimpo eval --scorer`, twice.

    python benchmarks/bench_onpolicy.py                      # SmolLM2-135M-Instruct, 2 rounds
    python benchmarks/bench_onpolicy.py --tiny --work /tmp/onpolicy-tiny --steps 2    # the whole path in minutes

It runs the commands a user runs, as subprocesses in the work folder (``--work``), and times each:

0. ``benchmarks/onpolicy_prompts.py`` writes train.jsonl and heldout.jsonl: everyday questions with
   checkable instructions, no held-out question among the training ones.
1. Round 1. ``qsimpo pairs train.jsonl --model BASE --scorer qsimpo.pairs.examples:follows_instructions``
   samples ``--n`` answers per prompt from the SFT model; ``qsimpo train configs/quickstart.yaml`` trains a
   LoRA adapter on the pairs from BASE; ``qsimpo eval ADAPTER --data heldout.jsonl --scorer ...`` answers the
   held-out prompts greedily with the adapter off (SFT) and on and judges both.
2. Round 2. The same, but ``qsimpo pairs --model`` is round 1's adapter, so the pairs are sampled from the
   aligned policy. ``qsimpo train`` starts a new adapter from BASE (it has no option to start from an
   existing adapter; ``train.resume_from`` resumes an interrupted run, not a new one) on round 2's pairs,
   and its eval is against the same SFT answers, so the rounds compare directly; round 2 against round 1
   is computed from the two eval.json files (same prompts, greedy answers).

BASE is ``qsimpo.realmodel.smollm2_path()``, or with ``--tiny`` a 2-layer random model built here
(a smoke test of the path, not of alignment). Prints a report and appends one JSON row (date, machine,
versions, commands, per-step seconds, the eval numbers, per-instruction follow rates and the first
``--show`` held-out answers of each model) to ``--results``. RESULTS.md is written by hand from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from onpolicy_prompts import make_prompts, write  # noqa: E402

SCORER = "qsimpo.pairs.examples:follows_instructions"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "adapters" / "bench-onpolicy", help="work folder (emptied first)")
    p.add_argument("--tiny", action="store_true", help="a tiny random base instead of SmolLM2 (smoke test)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of pairs -> train -> eval")
    p.add_argument("--heldout", type=int, default=16, help="questions held out (of 60)")
    p.add_argument("--variants", type=int, default=1, help="training prompts per training question")
    p.add_argument("--n", type=int, default=5, help="answers sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, sampled and in eval")
    p.add_argument("--pairs-batch", type=int, default=16, help="qsimpo pairs --batch-size")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per round")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--max-length", type=int, default=192, help="data.max_length (prompt + answer tokens)")
    p.add_argument("--max-prompt-length", type=int, default=96, help="data.max_prompt_length")
    p.add_argument("--seed", type=int, default=0, help="prompt split and instruction draw")
    p.add_argument("--show", type=int, default=3, help="held-out answers shown per round")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results_onpolicy.jsonl"),
                   help="JSONL file the run's row is appended to ('' for none)")
    args = p.parse_args(argv)
    for name in ("rounds", "n", "max_new_tokens", "pairs_batch", "steps", "batch", "show"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def tiny_base(folder: Path, texts: list[str]) -> Path:
    """A 2-layer random Llama-style model with a BPE tokenizer learned from ``texts`` and a chat template."""
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    tok = build_tokenizer(texts, vocab_size=320)
    return save_base(build_model(tok, hidden_size=64, num_layers=2, num_heads=4, max_positions=512), tok, folder)


def run(cmd: list[str], work: Path, log: Path) -> tuple[float, float]:
    """Run one qsimpo command in ``work`` (progress bars on this terminal, output also in ``log``); stop if it fails.

    Returns (wall seconds, CPU seconds): the CPU time (user + system) says how much work the step was
    whatever else shared the machine."""
    print("$ " + shlex.join(cmd), flush=True)
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, "-m", *cmd], cwd=work, stdout=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    log.write_text(done.stdout)
    sys.stdout.write(done.stdout)
    if done.returncode != 0:
        sys.exit(f"`{shlex.join(cmd[:2])}` failed with exit code {done.returncode} (its output: {log})")
    return time.perf_counter() - t0, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def pairs_summary(out: Path) -> dict:
    """What a pairs file holds: pairs, drops by reason, and the scores of the sampled answers."""
    rows, dropped = read_jsonl(out), read_jsonl(Path(f"{out}.dropped.jsonl"))
    scores = [s for r in rows for s in r["all_rm_scores"]] + [s for d in dropped for s in d.get("all_rm_scores") or []]
    chosen = [max(r["all_rm_scores"]) for r in rows]
    rejected = [min(r["all_rm_scores"]) for r in rows]
    return {"pairs": len(rows), "dropped": dict(Counter(d["reason"] for d in dropped)),
            "mean_sample_score": float(np.mean(scores)) if scores else None,
            "mean_chosen": float(np.mean(chosen)) if rows else None,
            "mean_rejected": float(np.mean(rejected)) if rows else None}


def training_summary(adapter: Path) -> dict:
    rows = read_jsonl(adapter / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r and "rewards/accuracies" in r]
    meta = json.loads((adapter / "qsimpo.json").read_text())
    k = min(5, len(steps))

    def mean(key, part):
        return float(np.mean([r[key] for r in part])) if part else None

    final = next((r for r in reversed(rows) if "train_runtime" in r), {})
    return {"steps": meta["global_step"], "epoch": meta["epoch"], "data": meta["data"]["train"],
            "train_loss": final.get("train_loss"), "train_runtime_s": final.get("train_runtime"), "window": k,
            "first": {"loss": mean("loss", steps[:k]), "accuracy": mean("rewards/accuracies", steps[:k])},
            "last": {"loss": mean("loss", steps[-k:]), "accuracy": mean("rewards/accuracies", steps[-k:])},
            "versions": meta["versions"]}


def answer_checks(samples: list[dict], side: str) -> dict:
    """Per instruction, how many held-out answers of ``side`` follow it; and the answers that are degenerate, cut or
    off topic (qsimpo.pairs.examples' own rules)."""
    from qsimpo.pairs.examples import MIN_WORDS, check_instructions, finished, on_topic, words

    followed, asked = Counter(), Counter()
    short = cut = off = 0
    for s in samples:
        prompt = [{"role": "user", "content": s["prompt"]}]
        for name, ok in check_instructions(prompt, s[side]).items():
            asked[name] += 1
            followed[name] += ok
        short += len(words(s[side])) < MIN_WORDS
        cut += not finished(s[side], prompt)
        off += not on_topic(prompt, s[side])
    return {"followed": {k: [followed[k], asked[k]] for k in sorted(asked)},
            "all_followed": sum(all(check_instructions([{"role": "user", "content": s["prompt"]}], s[side]).values())
                                for s in samples),
            "under_min_words": short, "unfinished": cut, "off_topic": off, "n": len(samples)}


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of a − b over prompts with the paired percentile bootstrap interval eval uses for its own statistics."""
    from qsimpo.eval.metrics import percentile_interval, resample_indices

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return {"mean": float(d.mean()), "ci": percentile_interval(d[resample_indices(d.size, seed=seed)].mean(-1))}


def eval_summary(ev: dict, show: int) -> dict:
    sc, samples = ev["scorer"], ev["generation"]["samples"]
    keys = ("n", "mean_score", "mean_score_ci", "wins", "losses", "ties", "win_rate", "win_rate_ci", "lc_win_rate",
            "lc_win_rate_ci", "mean_length_tokens")
    return {**{k: sc[k] for k in keys},
            "score_difference": paired_difference([s["aligned_score"] for s in samples], [s["sft_score"] for s in samples]),
            "checks": {side: answer_checks(samples, side) for side in ("sft", "aligned")},
            "examples": [{k: s[k] for k in ("prompt", "sft", "aligned", "sft_score", "aligned_score")} for s in samples[:show]]}


def between_rounds(ev1: dict, ev2: dict) -> dict:
    """Round 2's aligned answers against round 1's (same prompts, greedy), with eval's own statistics."""
    from qsimpo.eval.metrics import scored_answers

    s1, s2 = ev1["generation"]["samples"], ev2["generation"]["samples"]
    if [s["prompt"] for s in s1] != [s["prompt"] for s in s2]:
        raise SystemExit("the two rounds' evals answered different prompts; cannot compare them")
    if [s["sft"] for s in s1] != [s["sft"] for s in s2]:
        print("note: the SFT answers differ between the two evals (nondeterministic kernels?)")
    stats = scored_answers([s["aligned_score"] for s in s1], [s["aligned_score"] for s in s2],
                           [s["aligned_tokens"] for s in s1], [s["aligned_tokens"] for s in s2])
    return {"round1_mean": stats["mean_score"]["sft"], "round2_mean": stats["mean_score"]["aligned"],
            "round2_win_rate": stats["win_rate"], "round2_win_rate_ci": stats["win_rate_ci"],
            "wins": stats["wins"], "losses": stats["losses"], "ties": stats["ties"],
            "score_difference": paired_difference([s["aligned_score"] for s in s2], [s["aligned_score"] for s in s1])}


def one_round(k: int, policy: str, base: str, args, work: Path, commands: list[str]) -> dict:
    folder = work / f"round{k}"
    folder.mkdir()
    pairs, adapter = f"round{k}/pairs.jsonl", f"round{k}/adapter"
    steps = {
        "pairs": ["qsimpo", "pairs", "train.jsonl", "--model", policy, "--scorer", SCORER, "--out", pairs,
                  "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.pairs_batch)],
        "train": ["qsimpo", "train", str(ROOT / "configs" / "quickstart.yaml"), "--model.name_or_path", base,
                  "--data.path", pairs, "--train.output_dir", adapter, "--train.max_steps", str(args.steps),
                  "--train.batch_size", str(args.batch), "--train.learning_rate", str(args.lr),
                  "--data.max_length", str(args.max_length), "--data.max_prompt_length", str(args.max_prompt_length),
                  "--train.logging_steps", "1", "--train.progress", "false"],
        "eval": ["qsimpo", "eval", adapter, "--data", "heldout.jsonl", "--scorer", SCORER,
                 "--max-new-tokens", str(args.max_new_tokens), "--out", f"round{k}/eval"],
    }
    seconds, cpu_seconds = {}, {}
    for name, cmd in steps.items():
        wall, cpu = run(cmd, work, folder / f"{name}.log")
        seconds[name], cpu_seconds[name] = round(wall, 1), round(cpu, 1)
        commands.append(shlex.join(cmd))
    seconds["round"], cpu_seconds["round"] = round(sum(seconds.values()), 1), round(sum(cpu_seconds.values()), 1)
    ev = json.loads((folder / "eval" / "eval.json").read_text())
    return {"policy": policy, "seconds": seconds, "cpu_seconds": cpu_seconds, "pairs": pairs_summary(work / pairs),
            "training": training_summary(work / adapter), "eval": eval_summary(ev, args.show), "_eval": ev}


def num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def ci(x: list[float]) -> str:
    return f"[{x[0]:.3f}, {x[1]:.3f}]"


def short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def print_round(k: int, r: dict) -> None:
    e, p, t = r["eval"], r["pairs"], r["training"]
    print(f"\n== round {k} (policy {r['policy']}) — seconds: {r['seconds']}; CPU seconds: {r['cpu_seconds']}")
    print(f"pairs: {p['pairs']} written, dropped {p['dropped']}; sampled answers' mean score {num(p['mean_sample_score'])}, "
          f"chosen {num(p['mean_chosen'])}, rejected {num(p['mean_rejected'])}")
    print(f"train: {t['steps']} steps, mean loss {num(t['train_loss'])}; first/last {t['window']} logged steps: loss "
          f"{num(t['first']['loss'])} -> {num(t['last']['loss'])}, reward accuracy {num(t['first']['accuracy'])} -> "
          f"{num(t['last']['accuracy'])}")
    ms, mc = e["mean_score"], e["mean_score_ci"]
    print(f"held-out ({e['n']} prompts) mean score: SFT {ms['sft']:.3f} {ci(mc['sft'])}, aligned {ms['aligned']:.3f} "
          f"{ci(mc['aligned'])}; difference {e['score_difference']['mean']:+.3f} {ci(e['score_difference']['ci'])}")
    print(f"win rate {e['win_rate']:.3f} {ci(e['win_rate_ci'])} ({e['wins']} W / {e['losses']} L / {e['ties']} T), "
          f"LC win rate {e['lc_win_rate']:.3f} {ci(e['lc_win_rate_ci'])}; mean tokens SFT "
          f"{e['mean_length_tokens']['sft']:.1f}, aligned {e['mean_length_tokens']['aligned']:.1f}")
    for side in ("sft", "aligned"):
        c = e["checks"][side]
        rates = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in c["followed"].items())
        print(f"  {side}: all instructions followed {c['all_followed']}/{c['n']}; {rates}; "
              f"under 3 words {c['under_min_words']}, unfinished {c['unfinished']}, off topic {c['off_topic']}")
    for x in e["examples"]:
        print(f"\n  prompt: {x['prompt']}\n  SFT     ({x['sft_score']:+.2f}): {short(x['sft'])}\n"
              f"  aligned ({x['aligned_score']:+.2f}): {short(x['aligned'])}")


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {**{m.__name__: m.__version__ for m in (torch, transformers, peft, bitsandbytes)},
            "python": platform.python_version(), "qsimpo_commit": commit.stdout.strip() or None}


def main(argv=None) -> None:
    args = parse_args(argv)
    work = args.work.resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    train, held = make_prompts(args.heldout, args.variants, args.seed)
    write(work / "train.jsonl", train)
    write(work / "heldout.jsonl", held)
    print(f"{len(train)} training prompts, {len(held)} held-out prompts (no question shared) in {work}")
    if args.tiny:
        base = str(tiny_base(work / "tiny-base", train + held))
    else:
        from qsimpo.realmodel import smollm2_path

        base = str(smollm2_path())
    commands, rounds = [], []
    policy = base
    for k in range(1, args.rounds + 1):
        rounds.append(one_round(k, policy, base, args, work, commands))
        print_round(k, rounds[-1])
        policy = f"round{k}/adapter"
    compare = between_rounds(rounds[0]["_eval"], rounds[1]["_eval"]) if len(rounds) > 1 else None
    if compare:
        print(f"\nround 2 vs round 1 (aligned answers): mean {compare['round1_mean']:.3f} -> {compare['round2_mean']:.3f}, "
              f"difference {compare['score_difference']['mean']:+.3f} {ci(compare['score_difference']['ci'])}; round 2 "
              f"win rate {compare['round2_win_rate']:.3f} {ci(compare['round2_win_rate_ci'])}")
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    if args.results:
        row = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "niceness": os.nice(0), "base": "tiny" if args.tiny else "smollm2_path()", "versions": versions(),
               "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
               "settings": {k: v for k, v in vars(args).items() if k not in ("work", "results")},
               "prompts": {"train": len(train), "heldout": len(held)},
               "commands": [c.replace(base, "BASE") for c in commands], "total_s": round(total, 1),
               "rounds": [{k: v for k, v in r.items() if k != "_eval"} | {"policy": r["policy"].replace(base, "BASE")}
                          for r in rounds],
               "round2_vs_round1": compare}
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
