"""qsimpo vs TRL's CPOTrainer SimPO, side by side on the same model, data and settings.

    pip install -e ".[bench]"
    python benchmarks/bench_simpo.py --device cpu      # hidden 512, 4 layers, vocab 32000, max_length 1024
    python benchmarks/bench_simpo.py --device cuda     # Llama-3-8B shapes, max_length 2048

Both tools get the same locally built NF4 base (random weights: nothing is downloaded), the
same LoRA (r=16, alpha=32, all linear layers, no dropout), gradient checkpointing, batch 4
pairs, one optimizer step per batch, SimPO with beta 2, gamma 1 (TRL: loss_type="simpo",
cpo_alpha=0, simpo_gamma=1), and the same HH-RLHF rows as explicit prompt/chosen/rejected
strings. Rows are chosen so that no pair needs truncation: TRL 1.16 never truncates prompts,
and an empty completion there turns every gradient into NaN, so a fair speed comparison
uses only pairs both tools handle. Each run is its own process (so peak RSS is its own);
runs alternate qsimpo, trl, qsimpo, trl, ... and the median of each is reported.

Measured: pairs/s and tokens/s over the timed steps (the first step is warm-up), where a
pair's tokens are prompt + chosen + rejected (the same data for both tools); peak memory
(RSS of the process on CPU, torch.cuda.max_memory_allocated on CUDA). Appends a row to
benchmarks/results.jsonl; RESULTS.md is written by hand from it.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared folder beside the checkout (a worktree one level further down finds the one above it)
HH = next((p for p in (d / "shared" / "data" / "hh-rlhf-harmless" / "sample.jsonl" for d in (ROOT.parent, ROOT.parent.parent))
           if p.exists()), ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "sample.jsonl")
SHAPES = {
    "cpu": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=1408, vocab_size=32000,
                max_length=1024),
    # Llama-3-8B: 32 query heads, 8 key/value heads (GQA), 8.03e9 parameters
    "cuda": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
                 vocab_size=128256, max_length=2048),
}
BATCH, BETA, GAMMA, LR = 4, 2.0, 1.0, 1e-5


def prepare(work: Path, device: str, n_pairs: int) -> dict:
    """Base model folder + explicit-format rows that fit max_length without truncation."""
    import torch  # noqa: F401

    from qsimpo.config import DataConfig
    from qsimpo.data import read_source, tokenize_pair
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    shape = SHAPES[device]
    triples = read_source(DataConfig(path=str(HH), format="implicit", on_bad_row="skip")).texts()
    tok = build_tokenizer([t["prompt"] + t["chosen"] for t in triples] + [t["rejected"] for t in triples], vocab_size=32000,
                          chat_template=False)
    keep = []
    for t in triples:
        p = tokenize_pair(tok, t, shape["max_length"], shape["max_length"] - 1)
        if p and not p["prompt_truncated"] and not p["response_truncated"]:
            keep.append({"prompt": t["prompt"], "chosen": t["chosen"], "rejected": t["rejected"],
                         "tokens": len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])})
        if len(keep) == n_pairs:
            break
    base = work / "base"
    if not (base / "config.json").exists():
        cfg = {k: shape[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                                     "vocab_size")}
        model = build_model(tok, max_positions=shape["max_length"] + 8, device=device, **cfg)
        if device == "cuda":
            model = model.to(torch.bfloat16)
        save_base(model, tok, base)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for r in keep))
    return {"base": str(base), "data": str(data), "pairs": len(keep), "tokens": [r["tokens"] for r in keep]}


class StepClock:
    """A TrainerCallback-compatible timer: wall time of every optimizer step (and the process's CPU time in it, which
    on a shared machine says how much work the step was whatever else ran)."""

    def __init__(self, cuda: bool = False):
        self.times, self.cpu_times, self.peaks, self.peaks_before, self.cuda = [], [], [], [], cuda

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_begin(self, args, state, control, **kw):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peaks_before.append(torch.cuda.max_memory_allocated() / 2**30)  # what the reset forgets
            torch.cuda.reset_peak_memory_stats()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kw):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        self.times.append(time.perf_counter() - self.t0)
        self.cpu_times.append(time.process_time() - self.c0)


class RecordingCollator:
    """The trainer's collator, remembering each batch's (prompt, chosen, rejected) lengths in order."""

    def __init__(self, collate):
        self.collate, self.seen = collate, []

    def __call__(self, features):
        self.seen.append([(len(f["prompt_ids"]), len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features])
        return self.collate(features)


def _peak(device: str) -> float:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def run_qsimpo(prep: dict, device: str, steps: int, out: Path, attn: str = "sdpa") -> dict:
    from qsimpo.config import load_config
    from qsimpo.train.recipe import train

    shape = SHAPES[device]
    cfg = load_config(None, [
        f"--model.name_or_path={prep['base']}", f"--data.path={prep['data']}", f"--train.output_dir={out}",
        f"--data.max_length={shape['max_length']}", f"--data.max_rows={BATCH * steps}",
        "--lora.r=16", "--lora.alpha=32", "--lora.dropout=0", f"--simpo.beta={BETA}", f"--simpo.gamma={GAMMA}",
        f"--train.batch_size={BATCH}", "--train.gradient_accumulation_steps=1", f"--train.max_steps={steps}",
        f"--train.learning_rate={LR}", "--train.save_steps=100000", "--train.progress=false", "--train.overwrite=true",
        f"--model.attn_implementation={attn}",
        "--train.group_by_length=false",  # same order as TRL's sampler sees: compare the step, not the sampler
    ])
    import qsimpo.train.recipe as qt

    clock = StepClock(cuda=device == "cuda")
    real_init = qt.SimPOTrainer.__init__

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [clock]
        k["data_collator"] = RecordingCollator(k["data_collator"])
        real_init(self, *a, **k)

    qt.SimPOTrainer.__init__ = init
    run = train(cfg)
    # per-step resets (plan_check) must not hide the run's peak: take the max over every window
    res = {"step_times": clock.times, "peak_gib": max([_peak(device)] + clock.peaks + clock.peaks_before)}
    if device == "cuda":
        res["plan_check"] = plan_check(cfg, prep["base"], run.trainer, clock)
    return res


def plan_check(cfg, base: str, trainer, clock) -> list[dict]:
    """`qsimpo plan`'s estimate for each step's own batch vs that step's measured peak.

    The estimate is taken without the CUDA context (torch.cuda.max_memory_allocated does not
    see it) for exactly the pairs of the step (collated in order: batch k is the k-th call).
    """
    from transformers import AutoConfig

    from qsimpo.train.plan import CONTEXT, GiB, estimate, shape_of, worst_batch

    shape = shape_of(AutoConfig.from_pretrained(base))
    rows = []
    for lengths, measured in zip(trainer.data_collator.seen, clock.peaks):
        est = (sum(estimate(cfg, shape, worst_batch(cfg, lengths)).values()) - CONTEXT) / GiB
        rows.append({"tokens": sum(map(sum, lengths)), "plan_gib": est, "measured_gib": measured,
                     "error": est / measured - 1})
    return rows


def run_trl(prep: dict, device: str, steps: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    shape = SHAPES[device]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    model = AutoModelForCausalLM.from_pretrained(prep["base"], quantization_config=q, dtype=dtype,
                                                 device_map={"": "cuda:0" if device == "cuda" else "cpu"},
                                                 attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(prep["base"])
    rows = [json.loads(line) for line in Path(prep["data"]).read_text().splitlines()][: BATCH * steps]
    args = CPOConfig(
        output_dir=str(out), loss_type="simpo", cpo_alpha=0.0, beta=BETA, simpo_gamma=GAMMA,
        max_length=shape["max_length"], per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=device == "cpu",
        bf16=device == "cuda", remove_unused_columns=False, dataloader_pin_memory=False,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = StepClock()
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[clock])
    trainer.train()
    return {"step_times": clock.times, "peak_gib": _peak(device)}


def count_params(base: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters())


def one(tool: str, work: Path, device: str, steps: int, attn: str) -> None:
    """Run one tool in this process and print its measurement as JSON (called by main via subprocess)."""
    import torch

    torch.manual_seed(0)
    prep = json.loads((work / "prep.json").read_text())
    if tool == "qsimpo":
        res = run_qsimpo(prep, device, steps, work / "out-qsimpo", attn)
    else:
        res = run_trl(prep, device, steps, work / "out-trl")
    tokens = prep["tokens"][: BATCH * steps]
    timed = res["step_times"][1:]  # the first step is warm-up
    res["pairs_per_s"] = BATCH * len(timed) / sum(timed)
    res["tokens_per_s"] = sum(tokens[BATCH:BATCH * steps]) / sum(timed)
    print("RESULT " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=SHAPES, default="cpu")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating qsimpo/trl rounds")
    ap.add_argument("--work", default="/tmp/qsimpo-bench")
    ap.add_argument("--max-length", type=int, help="override the configuration's max_length (smoke runs)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU (H100/H200: 989)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "flex_attention"],
                    help="qsimpo's attention kernel (flex_attention: CUDA only, pairs packed padding-free); TRL always uses sdpa")
    ap.add_argument("--one", choices=["qsimpo", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_length:
        SHAPES[args.device]["max_length"] = args.max_length
    work = Path(args.work) / args.device
    if args.one:
        return one(args.one, work, args.device, args.steps, args.attn)
    if not HH.exists():
        sys.exit(f"the HH-RLHF sample is not at {HH}: the benchmark runs on it")
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare(work, args.device, BATCH * args.steps)
    (work / "prep.json").write_text(json.dumps(prep))
    print(f"{prep['pairs']} pairs, mean {statistics.mean(prep['tokens']):.0f} tokens (prompt + chosen + rejected)")
    results = {"qsimpo": [], "trl": []}
    for r in range(args.rounds):
        for tool in ("qsimpo", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--one", tool, "--device", args.device, "--steps",
                                   str(args.steps), "--work", args.work, "--attn", args.attn] + (["--max-length", str(args.max_length)] if args.max_length else []), capture_output=True, text=True,
                                  env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{tool} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            res = json.loads(line[0][7:])
            results[tool].append(res)
            print(f"round {r + 1} {tool:7s} {res['pairs_per_s']:.3f} pairs/s  {res['tokens_per_s']:.0f} tokens/s  "
                  f"peak {res['peak_gib']:.2f} GiB", flush=True)
    med = {t: {k: statistics.median(x[k] for x in v) for k in ("pairs_per_s", "tokens_per_s", "peak_gib")}
           for t, v in results.items()}
    import peft
    import torch
    import transformers
    import trl

    row = {
        "date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "qsimpo_attn": args.attn,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}, "shape": SHAPES[args.device], "batch_pairs": BATCH, "steps": args.steps,
        "rounds": args.rounds, "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                            "peft": peft.__version__, "trl": trl.__version__},
        "qsimpo": med["qsimpo"], "trl": med["trl"],
        "speedup_pairs_per_s": med["qsimpo"]["pairs_per_s"] / med["trl"]["pairs_per_s"],
        "memory_ratio": med["qsimpo"]["peak_gib"] / med["trl"]["peak_gib"],
        "command": "python benchmarks/bench_simpo.py " + " ".join(sys.argv[1:]),
    }
    checks = [c for r in results["qsimpo"] for c in r.get("plan_check", [])]
    if checks:  # qsimpo plan vs measured, per step
        row["plan_check"] = {"steps": len(checks), "median_error": statistics.median(c["error"] for c in checks),
                             "worst_error": max((c["error"] for c in checks), key=abs), "rows": checks[:10]}
        print(f"qsimpo plan vs measured peak per step: median error {row['plan_check']['median_error']:+.1%}, "
              f"worst {row['plan_check']['worst_error']:+.1%} over {len(checks)} steps")
    if args.device == "cuda":  # model FLOPs utilisation: 4·N FLOPs per trained token (LoRA: no weight grads)
        n = count_params(prep["base"])
        for t in ("qsimpo", "trl"):
            row[t]["mfu"] = 4 * n * row[t]["tokens_per_s"] / (args.peak_tflops * 1e12)
        row["params"] = n
    with (ROOT / "benchmarks" / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"qsimpo/trl: {row['speedup_pairs_per_s']:.2f}x pairs/s, {row['memory_ratio']:.2f}x peak memory")


if __name__ == "__main__":
    main()
