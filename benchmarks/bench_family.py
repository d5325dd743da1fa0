"""The loss family side by side: SimPO, DPO, ORPO, CPO and ARPO trained on the same pairs with the same budget.

    python benchmarks/bench_family.py                         # the quickstart's pairs on SmolLM2-135M-Instruct
    python benchmarks/bench_family.py --losses simpo,dpo --steps 4 --work /tmp/family-smoke
    python benchmarks/bench_family.py --steps 8 --jobs 2 --reuse   # two trainings at a time; keeps finished runs
    python benchmarks/bench_family.py --onpolicy --steps 8 --work /tmp/family-onpolicy   # one on-policy round

It runs the commands a user runs, as subprocesses in the work folder (``--work``, emptied first):

1. Data: the quickstart's shipped pairs (qsimpo/quickstart/data/pairs.jsonl), split as ``qsimpo quickstart``
   splits them (``qsimpo.quickstart.real.split_pairs``: whole topics held out), into train.jsonl and heldout.jsonl.
2. ``qsimpo train`` once per loss, from the quickstart's own training config (configs/quickstart.yaml: NF4
   SmolLM2, LoRA r 16, lr 5e-4, batch 4, cosine schedule) with ``--loss.type LOSS``: the same pairs, steps,
   batch, learning rate and seed for every loss. Each loss has its paper's defaults (qsimpo's schema
   defaults; SimPO keeps the quickstart's β 2.5, γ/β 0.5, its paper's Llama-3-Instruct setting); for the
   other losses the config's ``simpo:`` section is left out (a parameter of another loss is an error). No
   loss is tuned. DPO's one-time reference pass comes on top of its steps (its seconds are recorded).
3. One ``qsimpo eval simpo/adapter dpo/adapter ... --data heldout.jsonl --scorer
   qsimpo.pairs.examples:concise_complete`` (eval.json ``kind: "comparison"``, in ``eval/``): the base loaded once,
   held-out log-probs of chosen and rejected under SFT (every adapter off, scored once) and each adapter, the
   per-token KL of each adapter from SFT on the held-out responses, and greedy answers of SFT (once) and each
   adapter to every held-out prompt (``--generate N``: the first N), judged by the example rule scorer whose
   preference the quickstart's pairs encode (a finished sentence, few words).

With ``--onpolicy``, one on-policy round (the paper's Instruct setting) replaces step 1's training pairs: 1b.
``qsimpo pairs train.jsonl --model BASE --scorer qsimpo.pairs.examples:concise_complete`` samples --num-samples
answers to each of the first --prompts distinct training prompts from SmolLM2 itself (temperature 0.8, top-p 0.95,
--pairs-max-new-tokens),
the example rule scorer judges them, and the best and worst become onpolicy.jsonl (prompts whose answers all tie
are counted and left out by `qsimpo pairs`); every loss then trains on onpolicy.jsonl. The held-out pairs and the
eval are step 3's, so the two rounds' tables read the same way.

Reported per loss, each with a 95% percentile bootstrap interval over held-out pairs or prompts (eval's own
bootstrap, seed 0): held-out reward accuracy under one shared definition (average log-prob of chosen above
rejected, SimPO's reward up to β; every loss scored the same way), the mean margin of average log-probs, the
chosen response's log-prob change from SFT (average per token, and summed: a negative change is likelihood
displacement), the greedy answers' mean length in tokens and its change from SFT's answers to the same prompts,
the scorer's win rate and length-controlled win rate against SFT, and the KL from SFT per response token (eval's
mean over the held-out responses' tokens, no interval); plus every adapter's win rate against every other (the
comparison's own statistics). Prints the tables and appends one row to benchmarks/results_family.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_onpolicy import ci, read_jsonl, versions  # noqa: E402

LOSSES = ("simpo", "dpo", "orpo", "cpo", "arpo")
SCORER = "qsimpo.pairs.examples:concise_complete"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "adapters" / "bench-family", help="work folder (emptied first)")
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated loss.type values, trained in this order")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per loss (the quickstart's 24)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest greedy answer in eval")
    p.add_argument("--generate", type=int, default=None,
                   help="answer only the first N held-out prompts (eval's --generate; default: every one)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="read only the first N held-out pairs (eval's --max-rows; default: all)")
    p.add_argument("--jobs", type=int, default=1, help="trainings run at once: for spare cores")
    p.add_argument("--onpolicy", action="store_true",
                   help="train on on-policy pairs: SmolLM2's own answers to the training prompts, judged by the scorer")
    p.add_argument("--num-samples", type=int, default=4, help="--onpolicy: answers sampled per prompt")
    p.add_argument("--pairs-max-new-tokens", type=int, default=64, help="--onpolicy: longest sampled answer")
    p.add_argument("--prompts", type=int, default=64,
                   help="--onpolicy: answer the first N distinct training prompts (8 steps of 4 pairs need 32 pairs)")
    p.add_argument("--reuse", action="store_true",
                   help="keep --work: a loss whose adapter finished --steps, and an eval that wrote eval/eval.json, are not "
                        "run again")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results_family.jsonl"),
                   help="JSONL file the run's row is appended to ('' for none)")
    args = p.parse_args(argv)
    unknown = [x for x in args.losses.split(",") if x not in LOSSES]
    if unknown:
        p.error(f"--losses: {', '.join(unknown)} is not one of {', '.join(LOSSES)}")
    if len(set(args.losses.split(","))) < 2 or len(set(args.losses.split(","))) < len(args.losses.split(",")):
        p.error(f"--losses {args.losses}: give two or more different losses (the benchmark compares them)")
    return args


def write_data(work: Path) -> tuple[int, int]:
    from qsimpo.quickstart.real import PAIRS, split_pairs

    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    train, held = split_pairs(rows)
    for name, part in (("train.jsonl", train), ("heldout.jsonl", held)):
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return len(train), len(held)


def write_configs(work: Path) -> dict[str, Path]:
    """The quickstart's config as is (SimPO), and without its simpo: section (every other loss)."""
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    other = {k: v for k, v in cfg.items() if k != "simpo"}
    (work / "simpo.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (work / "other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    return {"simpo": work / "simpo.yaml", "other": work / "other.yaml"}


def pairs_command(base: str, num_samples: int, max_new_tokens: int, prompts: int) -> list[str]:
    """One on-policy round: the policy's own answers to the first ``prompts`` distinct training prompts, best vs worst
    by the scorer."""
    return ["qsimpo", "pairs", "train.jsonl", "--model", base, "--scorer", SCORER, "--out", "onpolicy.jsonl",
            "--num-samples", str(num_samples), "--max-new-tokens", str(max_new_tokens), "--temperature", "0.8",
            "--top-p", "0.95", "--seed", "0", "--max-prompts", str(prompts)]


def train_command(loss: str, base: str, configs: dict, steps: int, data: str = "train.jsonl") -> list[str]:
    return ["qsimpo", "train", str(configs["simpo" if loss == "simpo" else "other"]), "--loss.type", loss,
            "--model.name_or_path", base, "--data.path", data, "--train.output_dir", f"{loss}/adapter",
            "--train.max_steps", str(steps), "--train.logging_steps", "1", "--train.progress", "false"]


def eval_command(losses: list[str], max_new_tokens: int, generate: int | None, max_rows: int | None) -> list[str]:
    """One ``qsimpo eval`` of every adapter on the one base: SFT scored and answering once, every adapter beside it."""
    return (["qsimpo", "eval", *[f"{x}/adapter" for x in losses], "--data", "heldout.jsonl", "--scorer", SCORER,
             "--max-new-tokens", str(max_new_tokens), "--out", "eval"]
            + (["--generate", str(generate)] if generate is not None else [])
            + (["--max-rows", str(max_rows)] if max_rows is not None else []))


def read_eval(path: Path, losses: list[str]) -> tuple[dict, dict[str, str]]:
    """(the comparison's eval.json, {loss: its adapter's label there}); the labels are found by each adapter's loss."""
    ev = json.loads(path.read_text())
    if ev.get("kind") != "comparison":
        raise SystemExit(f"{path} is not the eval.json of several adapters (kind {ev.get('kind')!r}, not 'comparison'): "
                         "run `qsimpo eval` with every loss's adapter, or delete it and rerun without --reuse")
    labels = {a["loss"]["type"]: a["name"] for a in ev["adapters"]}
    missing = [x for x in losses if x not in labels]
    if missing or len(labels) != len(ev["adapters"]):
        raise SystemExit(f"{path} compares {', '.join(a['name'] for a in ev['adapters'])}, not one adapter for each of "
                         f"{', '.join(losses)}: delete it and rerun")
    if ev["per_pair"] is None or ev["scorer"] is None:
        raise SystemExit(f"{path} has no held-out pairs or no scorer section: it was not written by this benchmark")
    return ev, {x: labels[x] for x in losses}


def run_all(cmds: list[tuple[str, list[str]]], work: Path, jobs: int) -> dict[str, float]:
    """Run (name, qsimpo command) pairs in ``work``, ``jobs`` at a time, each one's output in ``name``.log; stop if one
    fails. Returns each one's wall seconds (from its own start: with jobs > 1 they share the cores)."""
    import subprocess

    seconds, queue, running = {}, list(cmds), {}
    while queue or running:
        while queue and len(running) < jobs:
            name, cmd = queue.pop(0)
            print("$ " + shlex.join(cmd), flush=True)
            log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
            proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=work, stdout=log, stderr=subprocess.STDOUT)
            running[name] = (proc, log, time.perf_counter())
        time.sleep(2)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode:
                    sys.exit(f"`{shlex.join(dict(cmds)[name][:2])}` for {name} failed with exit code {proc.returncode} "
                             f"(its output: {work / name}.log)")
                seconds[name] = round(time.perf_counter() - t0, 1)
                print(f"{name}: {seconds[name]:.0f} s", flush=True)
    return seconds


def boot(values, seed: int = 0) -> dict:
    """Mean with eval's 95% percentile bootstrap interval (over pairs or prompts)."""
    from qsimpo.eval.metrics import percentile_interval, resample_indices

    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "ci": percentile_interval(v[resample_indices(v.size, seed=seed)].mean(-1))}


def summarize(ev: dict, label: str) -> dict:
    """One adapter's numbers from the comparison's eval.json: per-pair log-probs (average per token) against the SFT
    model's, its greedy answers' lengths, the scorer's verdict against SFT and its KL from SFT."""
    pp = ev["per_pair"]
    a_c, a_r = np.array(pp[f"{label}_logp_chosen"]), np.array(pp[f"{label}_logp_rejected"])
    s_c, s_r = np.array(pp["sft_logp_chosen"]), np.array(pp["sft_logp_rejected"])
    n_c = np.array(pp["chosen_len"], dtype=float)
    samples = ev["generation"]["samples"]
    tokens = np.array([s["tokens"][label] for s in samples], dtype=float)
    sft_tokens = np.array([s["tokens"]["sft"] for s in samples], dtype=float)
    sc = next(c for c in ev["scorer"]["comparisons"] if c["model"] == label and c["against"] == "sft")
    gen = ev["generation"]["models"][label]
    return {
        "pairs": len(a_c),
        "accuracy": boot(a_c > a_r), "sft_accuracy": boot(s_c > s_r),
        "margin": boot(a_c - a_r), "sft_margin": boot(s_c - s_r),
        "chosen_change_avg": boot(a_c - s_c), "chosen_change_sum": boot((a_c - s_c) * n_c),
        "rejected_change_avg": boot(a_r - s_r),
        "kl_from_sft": next(a["kl_from_sft"] for a in ev["adapters"] if a["name"] == label),
        "prompts": sc["n"], "tokens": boot(tokens), "sft_tokens": boot(sft_tokens),
        "tokens_change": boot(tokens - sft_tokens), "unfinished_rate": gen["unfinished_rate"],
        "mean_score": sc["mean_score"], "mean_score_ci": sc["mean_score_ci"],
        "win_rate": sc["win_rate"], "win_rate_ci": sc["win_rate_ci"],
        "lc_win_rate": sc["lc_win_rate"], "lc_win_rate_ci": sc["lc_win_rate_ci"], "lc_fallback": sc["lc_fallback"],
        "wins": [sc["wins"], sc["losses"], sc["ties"]],
    }


def head_to_head(ev: dict, labels: dict[str, str]) -> dict:
    """Every adapter's greedy answers against every other's, on the same prompts: the comparison's own statistics."""
    loss = {v: k for k, v in labels.items()}
    return {f"{loss[c['model']]} vs {loss[c['against']]}": {
                "win_rate": c["win_rate"], "win_rate_ci": c["win_rate_ci"], "lc_win_rate": c["lc_win_rate"],
                "lc_win_rate_ci": c["lc_win_rate_ci"], "wins": [c["wins"], c["losses"], c["ties"]]}
            for c in ev["scorer"]["comparisons"] if c["against"] != "sft" and c["model"] in loss and c["against"] in loss}


def training(work: Path, loss: str) -> dict:
    meta = json.loads((work / loss / "adapter" / "qsimpo.json").read_text())
    final = next((r for r in reversed(read_jsonl(work / loss / "adapter" / "metrics.jsonl")) if "train_runtime" in r), {})
    return {"steps": meta["global_step"], "loss": meta["loss"], "train_runtime_s": final.get("train_runtime"),
            "train_loss": final.get("train_loss"), "reference": meta.get("reference")}


def show(r: dict) -> str:
    return f"{r['mean']:+.3f} {ci(r['ci'])}"


def results(ev: dict, labels: dict[str, str]) -> dict:
    """Every number the benchmark reports from the comparison's eval.json, per loss and head to head."""
    first = next(iter(labels.values()))
    return {"losses": {x: summarize(ev, label) for x, label in labels.items()}, "head_to_head": head_to_head(ev, labels),
            "sft": {k: summarize(ev, first)[k] for k in ("sft_accuracy", "sft_margin", "sft_tokens", "pairs", "prompts")},
            "labels": labels}


def print_tables(res: dict) -> None:
    print("\n| loss | held-out reward accuracy | margin (avg log-prob) | chosen log-prob change vs SFT, avg / summed "
          "| rejected change (avg) | KL from SFT per token | answer tokens (change vs SFT) | win rate vs SFT "
          "| LC win rate vs SFT | training loop s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for loss, s in res["losses"].items():
        t = res.get("training", {}).get(loss) or {}
        ref = t["reference"]["train"]["seconds"] if t.get("reference") else None
        train = f"{t['train_runtime_s']:.0f}" if t.get("train_runtime_s") else "-"
        print(f"| {loss} | {s['accuracy']['mean']:.3f} {ci(s['accuracy']['ci'])} | {show(s['margin'])} | "
              f"{show(s['chosen_change_avg'])} / {show(s['chosen_change_sum'])} | {show(s['rejected_change_avg'])} | "
              f"{s['kl_from_sft']['per_token']:.4f} | {s['tokens']['mean']:.1f} ({show(s['tokens_change'])}) | "
              f"{s['win_rate']:.3f} {ci(s['win_rate_ci'])} {'/'.join(map(str, s['wins']))} | "
              f"{s['lc_win_rate']:.3f} {ci(s['lc_win_rate_ci'])} | {train}" + (f" (+ reference {ref:.0f})" if ref else "")
              + " |")
    sft = res["sft"]
    print(f"\nSFT (adapters off): reward accuracy {sft['sft_accuracy']['mean']:.3f} {ci(sft['sft_accuracy']['ci'])}, "
          f"margin {show(sft['sft_margin'])}, answer tokens {sft['sft_tokens']['mean']:.1f} {ci(sft['sft_tokens']['ci'])}; "
          f"{sft['pairs']} held-out pairs, {sft['prompts']} prompts answered")
    print("\n| head to head (greedy answers, same prompts) | win rate | W / L / T | LC win rate |\n|---|---|---|---|")
    for k, v in res["head_to_head"].items():
        print(f"| {k} | {v['win_rate']:.3f} {ci(v['win_rate_ci'])} | {'/'.join(map(str, v['wins']))} | "
              f"{v['lc_win_rate']:.3f} {ci(v['lc_win_rate_ci'])} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    from qsimpo.realmodel import smollm2_path

    work = args.work.resolve()
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_train, n_held = write_data(work)
    configs = write_configs(work)
    base, losses = str(smollm2_path()), args.losses.split(",")
    print(f"{n_train} training pairs, {n_held} held-out pairs; losses {', '.join(losses)}; {args.steps} steps each")

    def done(loss: str) -> bool:
        meta = work / loss / "adapter" / "qsimpo.json"
        return meta.exists() and json.loads(meta.read_text())["global_step"] == args.steps

    data, pairs, pairs_s = "train.jsonl", [], None
    if args.onpolicy:  # one on-policy round: SmolLM2's own answers, judged, become the training pairs
        data = "onpolicy.jsonl"
        if not (args.reuse and (work / data).exists()):
            pairs = [("pairs", pairs_command(base, args.num_samples, args.pairs_max_new_tokens, args.prompts))]
            pairs_s = run_all(pairs, work, 1).get("pairs")
        print(f"{len(read_jsonl(work / data))} on-policy pairs from {n_train} training pairs' prompts")
    trains = [(f"{x}/train", train_command(x, base, configs, args.steps, data)) for x in losses if not done(x)]
    for x in losses:
        (work / x).mkdir(exist_ok=True)
    seconds = {x: {} for x in losses}
    for name, wall in run_all(trains, work, args.jobs).items():
        seconds[name.split("/")[0]]["train"] = wall
    eval_json = work / "eval" / "eval.json"
    evals = [] if args.reuse and eval_json.exists() else [
        ("eval", eval_command(losses, args.max_new_tokens, args.generate, args.max_rows))]
    seconds["eval"] = run_all(evals, work, 1).get("eval")
    commands = [shlex.join(c) for _, c in pairs + trains + evals]
    ev, labels = read_eval(eval_json, losses)
    res = {**results(ev, labels), "training": {x: training(work, x) for x in losses}, "seconds": seconds,
           "eval_seconds_recorded": ev.get("seconds")}
    if args.onpolicy:
        settings = json.loads((work / "onpolicy.jsonl.settings.json").read_text()) if (
            work / "onpolicy.jsonl.settings.json").exists() else None
        res["onpolicy"] = {"pairs": len(read_jsonl(work / data)), "seconds": pairs_s, "settings": settings}
    print_tables(res)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.results:
        row = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "niceness": os.nice(0), "load_average_end": os.getloadavg(), "versions": versions(),
               "command": "python " + shlex.join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
               "settings": {k: str(v) for k, v in vars(args).items() if k not in ("work", "results")},
               "pairs": {"train": n_train, "heldout": n_held}, "training_data": data, "scorer": SCORER,
               "commands": [c.replace(base, "BASE") for c in commands], "total_s": round(total, 1), **res}
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
