"""The other losses at real shapes: qsimpo DPO vs SimPO, and qsimpo DPO / ORPO / CPO vs TRL's trainers (issue 28).

    python benchmarks/bench_losses.py --compare dpo-simpo --rows 16 --rounds 2
    python benchmarks/bench_losses.py --compare dpo-trl --rows 16 --rounds 1
    python benchmarks/bench_losses.py --compare orpo-cpo-trl --rows 16 --rounds 1
    python benchmarks/bench_losses.py --compare orpo-cpo-trl-auto --rows 16 --rounds 2   # qsimpo within TRL's peak
    python benchmarks/bench_losses.py --compare all --rows 12 --rounds 1    # the eight runs above in one round
    python benchmarks/bench_losses.py --report

The setting is bench_real_shapes.py's, imported from it (its docstring says it whole): SmolLM2-135M-Instruct
with its real weights, NF4 with double quantization, fp32 compute (TRL: bf16=False), SDPA, the first --rows
conversational HH-RLHF harmless rows, one epoch, 4 pairs a step, LoRA r 16 / alpha 32 / all linear / no dropout,
AdamW lr 1e-5, gradient checkpointing on every layer for both tools (TRL's setting; DPOConfig's default too).
Each loss has its paper's defaults, which are qsimpo's and TRL's alike: DPO sigmoid β 0.1; ORPO λ 0.1 (TRL's
`beta`); CPO sigmoid β 0.1, α 1.0 (TRL's `cpo_alpha`); SimPO β 2, γ 1 as in bench_real_shapes.

Variants (each in its own process, so whole-process time and peak RSS are its own; those of one --compare
run alternately in every round, so they share whatever load the machine has):
  qsimpo-simpo, qsimpo-dpo, qsimpo-orpo, qsimpo-cpo   qsimpo train with --loss.type (DPO: the reference
                     log-probs computed once before the first step, its time recorded as "reference")
  trl-dpo            trl.DPOTrainer with peft_config: its PEFT default, the adapter-off reference forward in every step
  trl-dpo-pre        the same with precompute_ref_log_probs=True (one reference pass before training)
  trl-orpo, trl-cpo  trl.experimental's ORPOTrainer and CPOTrainer (loss_type sigmoid)
  qsimpo-orpo-auto, qsimpo-cpo-auto   train.gradient_checkpointing: auto with train.memory_budget = the peak RSS the
                     TRL run before it in the same round reached (as bench_real_shapes.py's qsimpo-auto): qsimpo
                     spends the memory it saves on recomputing fewer layers, and stays within TRL's peak

Every run gets a fresh datasets cache (HF_DATASETS_CACHE), so each one tokenizes its rows and each DPO run
computes its reference pass instead of reading back the previous run's (both tools cache them there).
Appends one row per invocation, every round's values included, to benchmarks/results.jsonl (bench "losses").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_shapes import BATCH, MAX_LENGTH, R, Recorder, prepare, run_qsimpo, trl_setup  # noqa: E402
from bench_simpo import HH, ROOT, StepClock, _peak  # noqa: E402

COMPARE = {  # the variants of each comparison, in the order they run in every round
    "dpo-simpo": ("qsimpo-dpo", "qsimpo-simpo"),
    "dpo-trl": ("qsimpo-dpo", "trl-dpo", "trl-dpo-pre"),
    "orpo-cpo-trl": ("qsimpo-orpo", "trl-orpo", "qsimpo-cpo", "trl-cpo"),
    "orpo-cpo-trl-auto": ("trl-orpo", "qsimpo-orpo-auto", "trl-cpo", "qsimpo-cpo-auto"),  # each budget: the TRL run before
}
# all three in one round (one qsimpo DPO run serves both of its comparisons): what a loaded machine allows
COMPARE["all"] = ("qsimpo-dpo", "qsimpo-simpo", "trl-dpo", "trl-dpo-pre", "qsimpo-orpo", "trl-orpo", "qsimpo-cpo", "trl-cpo")
PAIRS = {  # (qsimpo's run, the run it is set against): speed = other's time / mine, peak = mine / other's
    "dpo-simpo": [("qsimpo-dpo", "qsimpo-simpo")],
    "dpo-trl": [("qsimpo-dpo", "trl-dpo"), ("qsimpo-dpo", "trl-dpo-pre")],
    "orpo-cpo-trl": [("qsimpo-orpo", "trl-orpo"), ("qsimpo-cpo", "trl-cpo")],
    "orpo-cpo-trl-auto": [("qsimpo-orpo-auto", "trl-orpo"), ("qsimpo-cpo-auto", "trl-cpo")],
}
PAIRS["all"] = [p for k in ("dpo-simpo", "dpo-trl", "orpo-cpo-trl") for p in PAIRS[k]]
VARIANTS = sorted({v for vs in COMPARE.values() for v in vs})


def run_trl(prep: dict, out: Path, variant: str) -> dict:
    model, tok, data, common, peft = trl_setup(prep, out)
    if variant.startswith("trl-dpo"):
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=variant == "trl-dpo-pre", **common)
        cls, keys = DPOTrainer, ("prompt_ids", "chosen_ids", "rejected_ids")
    elif variant == "trl-orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(beta=0.1, **common)
        cls, keys = ORPOTrainer, ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, **common)
        cls, keys = CPOTrainer, ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    clock = StepClock()
    t0 = time.perf_counter()
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft, callbacks=[clock])
    init_s = time.perf_counter() - t0  # trl-dpo-pre: its reference pass runs here, in the trainer's __init__
    trainer.data_collator = Recorder(trainer.data_collator, keys)
    trainer.train()
    trainer.save_model(str(out))
    layers = model.config.num_hidden_layers
    return {"step_times": clock.times, "step_cpu_times": clock.cpu_times, "batches": trainer.data_collator.seen,
            "checkpointed": layers,
            "layers": layers, "trainer_init_s": init_s}


def one(variant: str, work: Path, budget: float | None = None) -> None:
    import torch

    torch.manual_seed(0)
    prep = json.loads((work / "prep.json").read_text())
    out = work / f"out-{variant}"
    if variant.endswith("-auto"):
        res = run_qsimpo(prep, out, "auto", budget, loss=variant.split("-")[1])
    elif variant.startswith("qsimpo-"):
        res = run_qsimpo(prep, out, "true", None, loss=variant.split("-", 1)[1])
    else:
        res = run_trl(prep, out, variant)
    res["peak_gib"] = _peak("cpu")
    use = resource.getrusage(resource.RUSAGE_SELF)
    res["cpu_s"] = use.ru_utime + use.ru_stime  # the whole process's CPU time: its work, whatever else shared the cores
    print("RESULT " + json.dumps(res))


def measure(variant: str, work: Path, budget: float | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="qsimpo-bench-ds-") as cache:
        cmd = [sys.executable, __file__, "--one", variant, "--work", str(work.parent)] + (
            ["--budget", f"{budget}"] if budget else [])
        env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_DATASETS_CACHE": cache}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[0][7:])
    res.update(wall_s=wall, pairs=sum(len(b) for b in res["batches"]), **step_medians(res))
    return res


def load_note() -> str:
    return "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def ratios(rounds: list[dict], pairs) -> dict:
    """For each (qsimpo run, other run) present: speed = other's time / mine (whole process and median step, wall and
    CPU), peak = mine / other's; medians over the rounds that hold both."""
    out = {}
    for mine, other in pairs:
        both = [g for g in rounds if mine in g and other in g]
        if not both:
            continue

        def med(f):
            vals = [f(g[mine], g[other]) for g in both]
            return statistics.median(vals) if None not in vals else None

        cpu = lambda key: lambda m, o: o[key] / m[key] if key in m and key in o else None  # noqa: E731
        out[f"{mine} vs {other}"] = {
            "whole_speed": med(lambda m, o: o["wall_s"] / m["wall_s"]), "whole_cpu_speed": med(cpu("cpu_s")),
            "step_speed": med(lambda m, o: o["step_s_median"] / m["step_s_median"]),
            "step_cpu_speed": med(cpu("step_cpu_median")), "peak_ratio": med(lambda m, o: m["peak_gib"] / o["peak_gib"]),
            "rounds": len(both)}
    return out


def step_medians(res: dict) -> dict:
    """Median step wall and CPU time, over the steps after the first (all steps when there is one)."""
    cpu = res.get("step_cpu_times")
    return {"step_s_median": statistics.median(res["step_times"][1:] or res["step_times"]),
            **({"step_cpu_median": statistics.median(cpu[1:] or cpu)} if cpu else {})}


def report(rows: list[dict]) -> None:
    for row in rows:
        print(f"\n{row['compare']}, {row['rows']} rows, {row['date']}, `{row['command']}`; {row['load']}\n")
        print("| round | run | whole process: wall (CPU) | steps: wall (CPU) | median step: wall (CPU) | reference pass: "
              "wall (CPU) | peak RSS |\n|---|---|---|---|---|---|---|")
        f = lambda x, k: f"{x[k]:.0f}" if k in x else "—"  # noqa: E731
        for i, g in enumerate(row["rounds"], 1):
            for v, x in g.items():
                x = {**x, **step_medians(x)}
                r = x.get("reference")
                ref = (f"{r['pass_s']['train']:.0f} s ({f(r, 'cpu_s')} s)" if r else
                       f"in the trainer's init ({x['trainer_init_s']:.0f} s)" if v == "trl-dpo-pre" else
                       "in every step" if v == "trl-dpo" else "none")
                steps_cpu = f"{sum(x['step_cpu_times']):.0f}" if "step_cpu_times" in x else "—"
                step_cpu = f"{x['step_cpu_median']:.1f}" if "step_cpu_median" in x else "—"
                print(f"| {i} | {v} | {f(x, 'wall_s')} s ({f(x, 'cpu_s')} s) | {sum(x['step_times']):.0f} s ({steps_cpu} s) | "
                      f"{x['step_s_median']:.1f} s ({step_cpu} s) | {ref} | {x['peak_gib']:.2f} GiB |")
        print("\n| qsimpo run vs | whole process: wall (CPU) | median step: wall (CPU) | peak RSS |\n|---|---|---|---|")
        rounds = [{v: {**x, **step_medians(x)} for v, x in g.items()} for g in row["rounds"]]
        n = lambda x: f"{x:.2f}×" if x is not None else "—"  # noqa: E731
        for pair, r in ratios(rounds, PAIRS[row["compare"]]).items():
            print(f"| {pair} | {n(r['whole_speed'])} ({n(r['whole_cpu_speed'])}) | {n(r['step_speed'])} "
                  f"({n(r['step_cpu_speed'])}) | {n(r['peak_ratio'])} |")


def partial_row(work: Path, compare: str) -> dict:
    """A results row from the runs an invocation finished (partial.jsonl), for one that was cut short."""
    runs = [json.loads(line) for line in (work / "partial.jsonl").read_text().splitlines()]
    rounds: dict[int, dict] = {}
    for r in runs:
        rounds.setdefault(r["round"], {})[r["variant"]] = r
    prep = json.loads((work / "prep.json").read_text())
    return {"compare": compare, "rows": prep["rows"], "date": time.strftime("%Y-%m-%d"), "load": runs[-1]["load"],
            "command": f"python benchmarks/bench_losses.py --compare {compare} (cut short: {len(runs)} runs finished)",
            "rounds": [rounds[k] for k in sorted(rounds)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", choices=sorted(COMPARE), default="dpo-simpo")
    ap.add_argument("--rows", type=int, default=16, help="pairs in the epoch (a multiple of 4)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default="/tmp/qsimpo-bench-losses")
    ap.add_argument("--report", action="store_true", help="print RESULTS.md tables from benchmarks/results.jsonl and exit")
    ap.add_argument("--partial", action="store_true", help="print the tables of the runs --work's last invocation finished")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)  # GiB, for the -auto variants
    args = ap.parse_args()
    work = Path(args.work) / "smollm2"
    if args.one:
        return one(args.one, work, args.budget)
    if args.report:
        lines = (ROOT / "benchmarks" / "results.jsonl").read_text().splitlines()
        return report([row for row in map(json.loads, lines) if row.get("bench") == "losses"])
    if args.partial:
        return report([partial_row(work, args.compare)])
    if not HH.exists():
        sys.exit(f"the HH-RLHF sample is not at {HH}: the benchmark runs on it")
    prep = prepare(work, "smollm2", args.rows, 0)
    (work / "prep.json").write_text(json.dumps(prep))
    print(f"smollm2: {prep['model_shape']}; {prep['rows']} rows ({prep['passed_over']} passed over)", flush=True)
    variants, rounds = COMPARE[args.compare], []
    for r in range(args.rounds):
        got = {}
        for v in variants:
            budget = got[f"trl-{v.split('-')[1]}"]["peak_gib"] if v.endswith("-auto") else None
            got[v] = res = measure(v, work, budget)
            with (work / "partial.jsonl").open("a") as f:  # every run as it ends: a cut-short invocation keeps its runs
                f.write(json.dumps({"round": r + 1, "variant": v, "load": load_note(), **res}) + "\n")
            ref = res.get("reference", {}).get("pass_s", {}).get("train")
            print(f"round {r + 1} {v:13s} whole {res['wall_s']:.0f} s  steps {sum(res['step_times']):.0f} s "
                  f"(median {res['step_s_median']:.2f} s)  peak {res['peak_gib']:.2f} GiB"
                  + (f"  reference pass {ref:.1f} s" if ref is not None else ""), flush=True)
        rounds.append(got)
    rounds = [{v: {**x, **step_medians(x)} for v, x in g.items()} for g in rounds]
    summary = ratios(rounds, PAIRS[args.compare])
    for pair, x in summary.items():
        print(f"{pair}: whole {x['whole_speed']:.2f}x, step {x['step_speed']:.2f}x, peak {x['peak_ratio']:.2f}x")
    import peft
    import torch
    import transformers
    import trl

    row = {
        "date": time.strftime("%Y-%m-%d"), "bench": "losses", "compare": args.compare, "model_shape": prep["model_shape"],
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": prep["rows"],
        "batch_pairs": BATCH, "max_length": MAX_LENGTH, "lora_r": R, "load": load_note(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__},
        "summary": summary, "rounds": rounds, "command": "python benchmarks/bench_losses.py " + " ".join(sys.argv[1:]),
    }
    with (ROOT / "benchmarks" / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
