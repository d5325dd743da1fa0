"""`qsimpo sft` vs TRL's SFTTrainer at SmolLM2's shape: whole process and peak RSS, one epoch of the same conversations.

    pip install -e ".[bench]"
    python benchmarks/bench_sft.py --rows 64 --rounds 2

Model: SmolLM2-135M-Instruct with its real weights (qsimpo.realmodel; 30 layers, hidden 576, vocab 49,152),
loaded as NF4 (double quantization) with fp32 compute and SDPA attention on both sides.

Data: the chosen sides of the first --rows usable pairs of the HH-RLHF harmless sample, as conversations
(the transcript's turns as chat messages, then the chosen response as the last assistant message), written
once to a messages jsonl both tools read. Conversations longer than MAX_LENGTH tokens are passed over (so
neither tool truncates), and so are empty responses.

Loss on the assistant tokens only, on both sides, with packing:
  qsimpo   `qsimpo sft` defaults: every assistant turn trained (content + end of turn), packing on (the data set
           packed best-fit decreasing into rows of up to max_length, block-diagonal attention inside a row),
           response-only chunked head, 1 packed row per step (--train.batch_size 1, as TRL's), gradient
           checkpointing on every layer
  trl      SFTConfig(assistant_only_loss=True, packing=True): BFD packing of the data set into rows of max_length,
           padding-free (position ids restart per conversation; transformers' SDPA mask keeps conversations apart),
           1 packed row per step, gradient checkpointing on (TRL's
           default). SmolLM2's chat template has no {% generation %} markers and TRL 1.16 cannot patch it
           (get_training_chat_template raises for it), so TRL gets the same template with the markers added around
           each assistant message's content and <|im_end|> (the text TRL renders is checked equal to the original
           template's for every row), which is what TRL asks its users to do.
TRL casts a quantized model's LoRA weights to bf16 (its QLoRA recipe) whatever `bf16` says; bf16=False keeps its
autocast off, so the base computes in fp32 as qsimpo's does. Both: LoRA r 16 / alpha 32 / all linear / no
dropout, AdamW lr 1e-4, one epoch.

Variants run alternately in every round, each in its own process (peak RSS is its own). Measured per run:
whole process wall time (imports, loading and quantizing, tokenizing, training, saving the adapter), the
training loop's step times, peak RSS, and per step the positions laid out and the tokens scored. Appends one
row per invocation to benchmarks/results_sft.jsonl.
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
from bench_real_shapes import MAX_LENGTH, R, shape_dict  # noqa: E402
from bench_simpo import HH, ROOT, StepClock, _peak  # noqa: E402

BATCH, LR = 1, 1e-4  # packed rows of MAX_LENGTH per step, on both sides
VARIANTS = ("trl", "qsimpo")
RESULTS = ROOT / "benchmarks" / "results_sft.jsonl"


# ------------------------------------------------------------------------------------------ data + templates
def marked_template(template: str) -> str:
    """SmolLM2's chat template with {% generation %} markers around each assistant message's content + <|im_end|>."""
    turn = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    if turn not in template:
        sys.exit("this SmolLM2 chat template is not the one the markers were written for")
    marked = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
              "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + turn + "{% endif %}")
    return template.replace(turn, marked)


def prepare(work: Path, rows: int, hh: Path) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from qsimpo.config import DataConfig
    from qsimpo.data import read_source
    from qsimpo.data.render import transcript_messages
    from qsimpo.realmodel import smollm2_path

    base = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(base)
    marked = marked_template(tok.chat_template)
    keep, passed_over = [], 0
    for t in read_source(DataConfig(path=str(hh), format="implicit", on_bad_row="skip")).texts():
        messages = transcript_messages(t["prompt"]) + [{"role": "assistant", "content": t["chosen"].strip()}]
        text = tok.apply_chat_template(messages, tokenize=False)
        if tok.apply_chat_template(messages, tokenize=False, chat_template=marked) != text:
            sys.exit(f"the marked template renders row {len(keep) + passed_over + 1} differently")
        if not messages[-1]["content"] or len(tok(text)["input_ids"]) > MAX_LENGTH - 2:
            passed_over += 1
            continue
        keep.append({"messages": messages})
        if len(keep) == rows:
            break
    work.mkdir(parents=True, exist_ok=True)
    data = work / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keep))
    (work / "marked_template.jinja").write_text(marked)
    return {"base": base, "data": str(data), "rows": len(keep), "passed_over": passed_over,
            "model_shape": shape_dict(AutoConfig.from_pretrained(base))}


# ------------------------------------------------------------------------------------------ one run
class Counter:
    """Wraps a trainer's collator; remembers each step's positions laid out and tokens scored."""

    def __init__(self, collate, scored):
        self.collate, self.scored, self.seen = collate, scored, []

    def __call__(self, features):
        batch = self.collate(features)
        self.seen.append((int(batch["input_ids"].numel()), int(self.scored(batch))))
        return batch


def run_qsimpo(prep: dict, out: Path) -> dict:
    import qsimpo.train.sft as qs
    from qsimpo.config import load_config

    cfg = load_config(None, [
        f"--model.name_or_path={prep['base']}", "--model.compute_dtype=float32", "--model.attn_implementation=sdpa",
        f"--data.path={prep['data']}", f"--data.max_length={MAX_LENGTH}",
        f"--lora.r={R}", "--lora.alpha=32", "--lora.dropout=0", f"--train.output_dir={out}",
        f"--train.batch_size={BATCH}", "--train.gradient_accumulation_steps=1", "--train.num_epochs=1",
        f"--train.learning_rate={LR}", "--train.save_steps=100000", "--train.progress=false", "--train.overwrite=true",
        "--train.gradient_checkpointing=true",
    ])
    clock, real_init = StepClock(), qs.SFTTrainer.__init__

    def init(self, *a, **k):
        k["callbacks"] = list(k.get("callbacks") or []) + [clock]
        k["data_collator"] = Counter(k["data_collator"], lambda b: len(b["score_index"]))
        real_init(self, *a, **k)

    qs.SFTTrainer.__init__ = init
    run = qs.sft(cfg)
    return {"step_times": clock.times, "steps": run.trainer.data_collator.seen}


def run_trl(prep: dict, work: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(prep["base"], quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"}, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(prep["base"])
    tok.chat_template = (work / "marked_template.jinja").read_text()
    rows = [json.loads(line) for line in Path(prep["data"]).read_text().splitlines()]
    args = SFTConfig(
        output_dir=str(out), assistant_only_loss=True, packing=True, max_length=MAX_LENGTH,
        per_device_train_batch_size=1, gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=LR,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        bf16=False,  # TRL's configs default to bf16 autocast: on the CPU, fp32 as qsimpo
    )
    peft = LoraConfig(r=R, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = StepClock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[clock])
    trainer.data_collator = Counter(trainer.data_collator, lambda b: int((b["labels"][:, 1:] != -100).sum()))
    trainer.train()
    trainer.save_model(str(out))  # a user's run keeps its adapter, as qsimpo's does
    return {"step_times": clock.times, "steps": trainer.data_collator.seen}


def one(variant: str, work: Path) -> None:
    import torch

    torch.manual_seed(0)
    prep = json.loads((work / "prep.json").read_text())
    out = work / f"out-{variant}"
    res = run_trl(prep, work, out) if variant == "trl" else run_qsimpo(prep, out)
    res["peak_gib"] = _peak("cpu")
    print("RESULT " + json.dumps(res))


# ------------------------------------------------------------------------------------------ driver
def measure(variant: str, work: Path, rows: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--one", variant, "--work", str(work)], capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.exit(f"{variant} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[0][7:])
    loop = sum(res["step_times"])
    res.update(wall_s=wall, loop_s=loop, whole_convs_per_s=rows / wall, loop_convs_per_s=rows / loop,
               positions=sum(p for p, _ in res["steps"]), scored=sum(s for _, s in res["steps"]))
    return res


def report(path: Path) -> None:
    """Markdown tables of every row in results_sft.jsonl: each round, then the medians of the ratios."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        print(f"\n{row['model_shape']}, {row['rows']} conversations, {row['date']}, `{row['command']}`, "
              f"load average {row['load_average']}\n")
        print("| round | run | whole process | training loop | steps | positions laid out | tokens scored | peak RSS |"
              "\n|---|---|---|---|---|---|---|---|")
        for i, g in enumerate(row["rounds"], 1):
            for v, x in g.items():
                print(f"| {i} | {v} | {x['whole_convs_per_s']:.3f} convs/s ({x['wall_s']:.0f} s) | "
                      f"{x['loop_convs_per_s']:.3f} convs/s ({x['loop_s']:.0f} s) | {len(x['steps'])} | "
                      f"{x['positions']} | {x['scored']} | {x['peak_gib']:.2f} GiB |")
        s = row["summary"]
        print(f"\nqsimpo / TRL (median of rounds): whole process {s['whole_speed']:.2f}×, training loop "
              f"{s['loop_speed']:.2f}×, peak RSS {s['peak_ratio']:.2f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=64, help="conversations in the epoch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/qsimpo-bench-sft")
    ap.add_argument("--hh", type=Path, default=HH, help="the HH-RLHF harmless sample (default: the shared data folder)")
    ap.add_argument("--report", action="store_true", help="print RESULTS.md tables from results_sft.jsonl and exit")
    ap.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    if args.one:
        return one(args.one, work)
    if args.report:
        return report(RESULTS)
    if not args.hh.exists():
        sys.exit(f"the HH-RLHF sample is not at {args.hh}: the benchmark runs on it (--hh PATH)")
    prep = prepare(work, args.rows, args.hh)
    (work / "prep.json").write_text(json.dumps(prep))
    print(f"smollm2: {prep['model_shape']}; {prep['rows']} conversations ({prep['passed_over']} passed over)", flush=True)
    rounds, loads = [], [os.getloadavg()[0]]
    for r in range(args.rounds):
        got = {}
        for v in VARIANTS:
            got[v] = res = measure(v, work, prep["rows"])
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1} {v:7s} whole {res['whole_convs_per_s']:.3f} convs/s ({res['wall_s']:.0f} s)  loop "
                  f"{res['loop_convs_per_s']:.3f} convs/s ({res['loop_s']:.0f} s, {len(res['steps'])} steps)  peak "
                  f"{res['peak_gib']:.2f} GiB  positions {res['positions']}  scored {res['scored']}", flush=True)
        rounds.append(got)
    ratio = lambda key: statistics.median(g["qsimpo"][key] / g["trl"][key] for g in rounds)  # noqa: E731
    summary = {"whole_speed": ratio("whole_convs_per_s"), "loop_speed": ratio("loop_convs_per_s"),
               "peak_ratio": ratio("peak_gib")}
    print(f"qsimpo/trl: whole {summary['whole_speed']:.2f}x, loop {summary['loop_speed']:.2f}x, "
          f"peak {summary['peak_ratio']:.2f}x", flush=True)
    import peft
    import torch
    import transformers
    import trl

    row = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "bench": "sft", "model_shape": prep["model_shape"],
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "rows": prep["rows"],
        "batch_rows": BATCH, "max_length": MAX_LENGTH, "lora_r": R,
        "load_average": f"1-min load {min(loads):.2f} to {max(loads):.2f} at the runs' ends (other jobs shared the cores)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "trl": trl.__version__},
        "summary": summary, "rounds": rounds, "command": "python benchmarks/bench_sft.py " + " ".join(sys.argv[1:]),
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
