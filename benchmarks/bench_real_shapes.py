"""qsimpo vs TRL's CPOTrainer SimPO at real model shapes: whole process and steady state, one epoch of the same rows.

    pip install -e ".[bench]"
    python benchmarks/bench_real_shapes.py --shape smollm2 --rows 32 --rounds 2
    python benchmarks/bench_real_shapes.py --shape llama3-8b-slice --layers 2 --rows 12 --rounds 2

Shapes:
  smollm2          SmolLM2-135M-Instruct with its real weights (30 layers, hidden 576, vocab 49,152)
  llama3-8b-slice  Llama-3-8B's widths (hidden 4096, MLP 14336, 32 query / 8 key-value heads, vocab 128,256,
                   untied head) with --layers decoder layers and random weights; SmolLM2's tokenizer and chat
                   template make its token ids (the ids fit the larger vocabulary)

Data: the first --rows pairs of the HH-RLHF harmless sample, turned into conversational rows (the
transcript's turns as chat messages, each response as one assistant message), so both tools apply the
model's own chat template to the same rows. Rows whose prompt + response does not fit max_length 1024
for TRL are passed over (TRL 1.16 never truncates a prompt, and an empty completion makes its loss NaN);
so are the two empty responses. Both tools train one epoch over exactly these rows (batch order cannot
change the total work), 4 pairs a step, LoRA r 16 / alpha 32 / all linear / no dropout, AdamW lr 1e-5,
SimPO β 2 γ 1 (TRL: loss_type="simpo", cpo_alpha=0, simpo_gamma=1), fp32 compute on NF4 weights
(double quantization), SDPA attention, each tool's defaults otherwise (qsimpo: shared-prompt packing,
response-only chunked head, length grouping; TRL: concatenated chosen/rejected rows, full logits).

Variants, run alternately in every round (each in its own process, so peak RSS is its own):
  trl              gradient checkpointing on every layer, as TRL's users run it
  qsimpo           train.gradient_checkpointing: true (every layer: TRL's settings)
  qsimpo-auto      train.gradient_checkpointing: auto with train.memory_budget = the peak RSS TRL reached
                   in the same round (the memory TRL's user has, spent on speed)

Measured per run: whole process (wall time from the process's start to its exit: imports, loading and
quantizing the model, reading and tokenizing the data, training, saving the adapter) and steady state
(the optimizer steps after the first); pairs/s for both; peak RSS. Each run also records the batches it
trained on, and the FLOP model below predicts each ratio from exactly those batches. Appends one row
per invocation, with every round's values, to benchmarks/results.jsonl.

FLOP model (what a step costs when compute-bound): per decoder layer and token, 2·(weights of q, k, v,
o, gate, up, down) FLOPs for the matmuls plus LoRA's 2·r·(in + out) per adapted linear; per row and
layer 4·S²·h for attention (SDPA's masked math computes the full S×S score matrix); 2·h·V per position
that goes through the output head. Training costs the matmuls 2× (forward + input gradient: the
frozen weights get no weight gradient), attention 3×, plus one more forward for every checkpointed
layer; the head 2×. TRL runs 2·B rows of the batch's longest prompt + response and the head on every
position; qsimpo runs B rows of prompt + chosen + rejected (padded to the batch's longest) and the
head on response tokens only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_simpo import HH, ROOT, StepClock, _peak  # noqa: E402

BATCH, BETA, GAMMA, LR, MAX_LENGTH, R = 4, 2.0, 1.0, 1e-5, 1024, 16
SLICE = dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, vocab_size=128256)
VARIANTS = ("trl", "qsimpo", "qsimpo-auto")


# ------------------------------------------------------------------------------------------ data + base
def prepare(work: Path, shape: str, rows: int, layers: int) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from qsimpo.config import DataConfig
    from qsimpo.data import read_source
    from qsimpo.data.render import transcript_messages
    from qsimpo.realmodel import smollm2_path

    smollm2 = smollm2_path()
    tok = AutoTokenizer.from_pretrained(smollm2)
    keep, passed_over = [], 0
    for t in read_source(DataConfig(path=str(HH), format="implicit", on_bad_row="skip")).texts():
        row = {"prompt": transcript_messages(t["prompt"]),
               "chosen": [{"role": "assistant", "content": t["chosen"].strip()}],
               "rejected": [{"role": "assistant", "content": t["rejected"].strip()}]}
        lengths = [len(tok(tok.apply_chat_template(row["prompt"] + row[k], tokenize=False))["input_ids"])
                   for k in ("chosen", "rejected")]
        if not row["chosen"][0]["content"] or not row["rejected"][0]["content"] or max(lengths) > MAX_LENGTH - 2:
            passed_over += 1
            continue
        keep.append(row)
        if len(keep) == rows:
            break
    work.mkdir(parents=True, exist_ok=True)
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keep))
    if shape == "smollm2":
        base = str(smollm2)
    else:
        base = str(work / f"base-{layers}L")
        if not (Path(base) / "config.json").exists():
            build_slice(tok, layers, Path(base))
    return {"base": base, "data": str(data), "rows": len(keep), "passed_over": passed_over,
            "model_shape": shape_dict(AutoConfig.from_pretrained(base))}


def build_slice(tok, layers: int, out: Path) -> None:
    import torch

    from qsimpo.quickstart.toy import build_model, save_base

    print(f"building a {layers}-layer Llama-3-8B-shaped slice (random weights) in {out}", flush=True)
    model = build_model(tok, num_layers=layers, max_positions=MAX_LENGTH + 8, **SLICE)
    model.config.rope_theta = 500000.0
    save_base(model.to(torch.bfloat16), tok, out)  # bf16 on disk (half the bytes); loaded as NF4 + fp32 compute


def shape_dict(cfg) -> dict:
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "mlp": cfg.intermediate_size,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
            "tied_head": bool(getattr(cfg, "tie_word_embeddings", False))}


# ------------------------------------------------------------------------------------------ FLOP model
def step_flops(shape: dict, rows: int, length: int, head_positions: int, checkpointed: float) -> float:
    """One optimizer step's FLOPs for `rows` rows of `length` positions (see the module docstring)."""
    h, m, L, V = shape["hidden"], shape["mlp"], shape["layers"], shape["vocab"]
    kv = h * shape["kv_heads"] // shape["heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]
    per_token = sum(2 * i * o + 2 * R * (i + o) for i, o in shapes)
    tokens = rows * length
    matmul = L * tokens * per_token
    attention = L * rows * 4 * length * length * h
    return matmul * (2 + checkpointed) + attention * (3 + checkpointed) + 2 * 2 * h * V * head_positions


def run_flops(shape: dict, tool: str, batches: list, checkpointed: float) -> dict:
    """All steps but the first (steady state) and all steps (whole run), from the batches a run trained on;
    and "unpadded": every sequence at its own length (what the layout costs without any padding)."""
    total, unpadded = [], 0.0
    for batch in batches:  # [(prompt, chosen, rejected) token counts] per pair
        if tool == "trl":
            length = max(p + max(c, r) for p, c, r in batch)
            total.append(step_flops(shape, 2 * len(batch), length, 2 * len(batch) * length, checkpointed))
            unpadded += sum(step_flops(shape, 1, p + x, p + x, checkpointed) for p, c, r in batch for x in (c, r))
        else:
            length = max(p + c + r for p, c, r in batch)
            total.append(step_flops(shape, len(batch), length, sum(c + r for _, c, r in batch), checkpointed))
            unpadded += sum(step_flops(shape, 1, p + c + r, c + r, checkpointed) for p, c, r in batch)
    return {"steady": sum(total[1:]), "all": sum(total), "unpadded": unpadded}


# ------------------------------------------------------------------------------------------ one run
class Recorder:
    """Wraps a trainer's collator; remembers each batch's (prompt, chosen, rejected) lengths."""

    def __init__(self, collate, keys):
        self.collate, self.keys, self.seen = collate, keys, []

    def __call__(self, features):
        p, c, r = self.keys
        self.seen.append([(len(f[p]), len(f[c]) - (len(f[p]) if c.startswith("chosen_input") else 0),
                           len(f[r]) - (len(f[p]) if r.startswith("rejected_input") else 0)) for f in features])
        return self.collate(features)


def run_qsimpo(prep: dict, out: Path, checkpointing: str, budget: float | None, loss: str = "simpo") -> dict:
    """One qsimpo run; ``loss`` other than simpo trains that loss with its paper's defaults (bench_losses.py),
    and DPO's one-time reference pass is timed on its own ("reference")."""
    import qsimpo.train.recipe as qt
    from qsimpo.config import load_config

    params = [f"--simpo.beta={BETA}", f"--simpo.gamma={GAMMA}"] if loss == "simpo" else [f"--loss.type={loss}"]
    overrides = [
        f"--model.name_or_path={prep['base']}", "--model.compute_dtype=float32", "--model.attn_implementation=sdpa",
        f"--data.path={prep['data']}", "--data.format=conversational", f"--data.max_length={MAX_LENGTH}",
        f"--lora.r={R}", "--lora.alpha=32", "--lora.dropout=0", *params,
        f"--train.output_dir={out}", f"--train.batch_size={BATCH}", "--train.gradient_accumulation_steps=1",
        "--train.num_epochs=1", f"--train.learning_rate={LR}", "--train.save_steps=100000", "--train.progress=false",
        "--train.overwrite=true", f"--train.gradient_checkpointing={checkpointing}",
    ] + ([f"--train.memory_budget={budget:.3f}GiB"] if budget else [])
    cfg = load_config(None, overrides)
    clock, split, ref = StepClock(), {}, {}
    real_init, real_split, real_ref = qt.PreferenceTrainer.__init__, qt.checkpoint_split, qt.reference_pass

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [clock]
        k["data_collator"] = Recorder(k["data_collator"], ("prompt_ids", "chosen_ids", "rejected_ids"))
        real_init(self, *a, **k)

    def chosen_split(*a, **k):
        split["layers"] = real_split(*a, **k)
        return split["layers"]

    def timed_reference(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        refs = real_ref(*a, **k)
        if refs:  # DPO only: the wall (and CPU) time of the whole step, cache lookup included, and the pass alone
            ref.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0,
                       computed={s: r.computed for s, r in refs.items()},
                       pass_s={s: r.seconds for s, r in refs.items()})
        return refs

    qt.PreferenceTrainer.__init__, qt.checkpoint_split, qt.reference_pass = init, chosen_split, timed_reference
    run = qt.train(cfg)
    layers = run.trainer.model.config.num_hidden_layers
    ck = split.get("layers", True)
    return {"step_times": clock.times, "step_cpu_times": clock.cpu_times, "batches": run.trainer.data_collator.seen,
            "checkpointed": ck if isinstance(ck, int) and not isinstance(ck, bool) else layers * bool(ck),
            "layers": layers, "loss": loss, **({"reference": ref} if ref else {})}


def trl_setup(prep: dict, out: Path) -> tuple:
    """What every TRL run shares: the NF4 base, tokenizer, rows, the config arguments and the LoRA (bench_losses.py too)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(prep["base"], quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(prep["base"])
    rows = [json.loads(line) for line in Path(prep["data"]).read_text().splitlines()]
    common = dict(
        output_dir=str(out), max_length=MAX_LENGTH,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=LR,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, remove_unused_columns=False,
        dataloader_pin_memory=False, bf16=False,  # TRL's configs default to bf16 autocast: on the CPU, fp32 as qsimpo
    )
    peft = LoraConfig(r=R, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return model, tok, Dataset.from_list(rows), common, peft


def run_trl(prep: dict, out: Path) -> dict:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, tok, data, common, peft = trl_setup(prep, out)
    args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=BETA, simpo_gamma=GAMMA, **common)
    clock = StepClock()
    trainer = CPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft, callbacks=[clock])
    trainer.data_collator = Recorder(trainer.data_collator, ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    trainer.train()
    trainer.save_model(str(out))  # a user's run keeps its adapter, as qsimpo's does
    layers = model.config.num_hidden_layers
    return {"step_times": clock.times, "batches": trainer.data_collator.seen, "checkpointed": layers, "layers": layers}


def one(variant: str, work: Path, budget: float | None) -> None:
    import torch

    torch.manual_seed(0)
    prep = json.loads((work / "prep.json").read_text())
    out = work / f"out-{variant}"
    res = run_trl(prep, out) if variant == "trl" else run_qsimpo(
        prep, out, "auto" if variant == "qsimpo-auto" else "true", budget)
    res["peak_gib"] = _peak("cpu")
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------------------ driver
def measure(variant: str, args, budget: float | None) -> dict:
    cmd = [sys.executable, __file__, "--one", variant, "--shape", args.shape, "--work", args.work,
           "--layers", str(args.layers)] + (["--budget-gib", str(budget)] if budget else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    wall = time.perf_counter() - t0
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[0][7:])
    pairs = sum(len(b) for b in res["batches"])
    timed = res["step_times"][1:]
    res.update(wall_s=wall, pairs=pairs, whole_pairs_per_s=pairs / wall,
               steady_pairs_per_s=sum(len(b) for b in res["batches"][1:]) / sum(timed))
    return res


def report(path: Path) -> None:
    """Markdown tables of every real-shape row in results.jsonl: each round, then the medians of the ratios."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("bench") != "real_shapes":
            continue
        print(f"\n{row['shape']} {row['model_shape']}, {row['rows']} rows, {row['date']}, `{row['command']}`\n")
        print("| round | run | whole process | training loop | peak RSS | checkpointed layers |\n|---|---|---|---|---|---|")
        for i, g in enumerate(row["rounds"], 1):
            for v, x in g.items():
                loop = x["pairs"] / sum(x["step_times"])
                print(f"| {i} | {v} | {x['whole_pairs_per_s']:.3f} pairs/s ({x['wall_s']:.0f} s) | {loop:.3f} pairs/s "
                      f"({sum(x['step_times']):.0f} s) | {x['peak_gib']:.2f} GiB | {x['checkpointed']}/{x['layers']} |")
        print("\n| qsimpo run / TRL | whole process | training loop | FLOP model (loop) | FLOP model, no padding | peak RSS |"
              "\n|---|---|---|---|---|---|")
        for v in [v for v in row["rounds"][0] if v != "trl"]:
            med = lambda f: statistics.median(f(g[v]) / f(g["trl"]) for g in row["rounds"])  # noqa: E731
            flops = lambda key: statistics.median(g["trl"]["flops"][key] / g[v]["flops"][key]  # noqa: E731
                                                  for g in row["rounds"] if key in g[v]["flops"])
            unpadded = f"{flops('unpadded'):.2f}×" if "unpadded" in row["rounds"][0][v]["flops"] else "not recorded"
            print(f"| {v} | {med(lambda x: x['whole_pairs_per_s']):.2f}× | "
                  f"{med(lambda x: x['pairs'] / sum(x['step_times'])):.2f}× | {flops('all'):.2f}× | {unpadded} | "
                  f"{med(lambda x: x['peak_gib']):.2f}× |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("smollm2", "llama3-8b-slice"), default="smollm2")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the llama3-8b-slice")
    ap.add_argument("--rows", type=int, default=32, help="pairs in the epoch (a multiple of 4)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, run in this order each round")
    ap.add_argument("--work", default="/tmp/qsimpo-bench-real")
    ap.add_argument("--report", action="store_true", help="print RESULTS.md tables from benchmarks/results.jsonl and exit")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--budget-gib", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work) / (args.shape if args.shape == "smollm2" else f"{args.shape}-{args.layers}L")
    if args.one:
        return one(args.one, work, args.budget_gib)
    if args.report:
        return report(ROOT / "benchmarks" / "results.jsonl")
    if not HH.exists():
        sys.exit(f"the HH-RLHF sample is not at {HH}: the benchmark runs on it")
    prep = prepare(work, args.shape, args.rows, args.layers)
    (work / "prep.json").write_text(json.dumps(prep))
    shape = prep["model_shape"]
    print(f"{args.shape}: {shape}; {prep['rows']} rows ({prep['passed_over']} passed over)", flush=True)
    variants = args.variants.split(",")
    rounds = []
    for r in range(args.rounds):
        got = {}
        for v in variants:
            budget = got["trl"]["peak_gib"] if v == "qsimpo-auto" and "trl" in got else None
            if v == "qsimpo-auto" and budget is None:
                sys.exit("qsimpo-auto takes its memory budget from the trl run before it: list trl first")
            res = measure(v, args, budget)
            res["flops"] = run_flops(shape, "trl" if v == "trl" else "qsimpo", res["batches"],
                                     res["checkpointed"] / res["layers"])
            res["budget_gib"] = budget
            got[v] = res
            print(f"round {r + 1} {v:12s} whole {res['whole_pairs_per_s']:.3f} pairs/s ({res['wall_s']:.0f} s)  "
                  f"steady {res['steady_pairs_per_s']:.3f} pairs/s  peak {res['peak_gib']:.2f} GiB  "
                  f"checkpointed {res['checkpointed']}/{res['layers']}", flush=True)
        rounds.append(got)
    summary = {}
    for v in variants:
        if v == "trl":
            continue
        ratio = lambda key: statistics.median(g[v][key] / g["trl"][key] for g in rounds)  # noqa: E731
        summary[v] = {
            "whole_speed": ratio("whole_pairs_per_s"), "steady_speed": ratio("steady_pairs_per_s"),
            "peak_ratio": ratio("peak_gib"),
            "flop_predicted_steady": statistics.median(g["trl"]["flops"]["steady"] / g[v]["flops"]["steady"] for g in rounds),
            "flop_predicted_unpadded": statistics.median(g["trl"]["flops"]["unpadded"] / g[v]["flops"]["unpadded"]
                                                         for g in rounds),
        }
        s = summary[v]
        print(f"{v}/trl: whole {s['whole_speed']:.2f}x, steady {s['steady_speed']:.2f}x (FLOP model "
              f"{s['flop_predicted_steady']:.2f}x; {s['flop_predicted_unpadded']:.2f}x without padding), peak {s['peak_ratio']:.2f}x")
    import peft
    import torch
    import transformers
    import trl

    row = {
        "date": time.strftime("%Y-%m-%d"), "bench": "real_shapes", "shape": args.shape, "model_shape": shape,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": prep["rows"],
        "batch_pairs": BATCH, "max_length": MAX_LENGTH, "lora_r": R,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__},
        "summary": summary, "rounds": rounds, "command": "python benchmarks/bench_real_shapes.py " + " ".join(sys.argv[1:]),
    }
    with (ROOT / "benchmarks" / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
