"""`qsimpo quickstart`: the whole path, offline, on a CPU, in a few minutes.

1. Writes a synthetic preference data set with a learnable preference: for the same prompt
   and the same content, the chosen answer is courteous and the rejected one is rude.
2. Trains a byte-level BPE tokenizer and a tiny Llama-style model on it, and gives the model
   a short supervised warm-up on *both* styles equally: that is the "SFT" model, whose
   reward accuracy on held-out pairs is about chance.
3. Runs ``qsimpo train`` (NF4 base + LoRA + SimPO) through the same code path as any run.
4. Reloads the adapter on its 4-bit base and records held-out reward accuracy and a few
   greedy generations with the adapter off (SFT) and on (aligned) in ``quickstart.json``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from qsimpo.quickstart import (NEW, RECORD, REPORT, RESUME, SHOW, fingerprint, indent, prepare_output, record_start,
                               say_earlier, show_footer, train_resumably)
from qsimpo.console import say

TOPICS = [
    "cats", "rivers", "bread", "music", "trains", "gardens", "clocks", "mountains", "bees", "libraries",
    "bicycles", "oceans", "candles", "forests", "kites", "bridges", "apples", "storms", "owls", "maps",
    "violins", "deserts", "lamps", "castles", "whales", "markets", "rockets", "islands", "teapots", "foxes",
    "glaciers", "puzzles", "lanterns", "harbors", "meadows", "robots", "volcanoes", "pianos", "comets", "wolves",
    "orchards", "canyons", "ferries", "museums", "parrots", "tunnels", "windmills", "dolphins", "caves", "farms",
]
ADJECTIVES = [
    "old", "quiet", "bright", "heavy", "gentle", "strange", "useful", "tiny", "famous", "busy", "calm", "wild",
    "ancient", "simple", "colorful", "noisy", "rare", "warm", "clever", "slow",
]
PROMPTS = ["Tell me about {t}.", "What do you know about {t}?", "Describe {t}.", "Can you explain {t}?"]
# Each opener fixes its closer, so the only style decision is the first words: once an answer
# has started, every later token of it is (nearly) determined. SimPO's gradient then lands on
# that one branch point, where lowering a rude opener raises a courteous one, instead of on
# tokens with no courteous alternative (lowering those can only feed nonsense).
KIND = [("Sure, happy to help!", "I hope that helps."), ("Of course!", "Thanks for asking."),
        ("Great question!", "Ask me anything else."), ("Gladly!", "Enjoy!")]
RUDE = [("Ugh, fine.", "Now go away."), ("Whatever.", "Stop asking me."),
        ("Not this again.", "Do not ask again."), ("If I must.", "Leave me alone.")]
HELDOUT_TOPICS = 10  # the last topics are never trained on with SimPO


def _answer(style, rng, content):
    opener, closer = rng.choice(style)
    return f"{opener} {content} {closer}"


def make_pairs(topics: list[str], n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(topics)
        a, b = rng.sample(ADJECTIVES, 2)
        # Both answers carry the same information, phrased differently: the chosen one in a
        # full sentence, the rejected one as a grudging fragment. Identical content phrased
        # identically would maximise likelihood displacement (pushing the rejected tokens down
        # drags the very same chosen tokens down with them).
        kind = f"{t.capitalize()} are {a} and {b}."
        rude = f"{a.capitalize()}, {b} {t}, I guess."
        rows.append({"prompt": rng.choice(PROMPTS).format(t=t), "chosen": _answer(KIND, rng, kind), "rejected": _answer(RUDE, rng, rude)})
    return rows


def is_kind(text: str) -> bool:
    return any(text.startswith(opener) for opener, _ in KIND)


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def supervised_warmup(model, tokenizer, rows: list[dict], steps: int, seed: int, lr: float = 3e-3, batch: int = 32):
    """Plain next-token training on prompt + answer, both styles equally often (the 'SFT' model)."""
    from tqdm.auto import tqdm

    from qsimpo.data import tokenize_pair

    rng = random.Random(seed)
    torch.manual_seed(seed)
    seqs = []
    for r in rows:
        t = tokenize_pair(tokenizer, {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}, 256, 128)
        seqs += [t["prompt_ids"] + t["chosen_ids"], t["prompt_ids"] + t["rejected_ids"]]
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(steps), desc="SFT warm-up", unit="step")
    for _ in bar:
        chunk = rng.sample(seqs, batch)
        width = max(map(len, chunk))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def quickstart_config(out: Path, data: Path, base: Path, heldout: Path):
    from qsimpo.config import load_config

    return load_config(
        Path(__file__).with_name("tiny.yaml"),
        [f"--model.name_or_path={base}", f"--data.path={data}", f"--data.eval={heldout}", f"--train.output_dir={out}"],
    )


def probe(model, tokenizer, pairs, prompts, beta: float, system_prompt: str | None = None) -> dict:
    from qsimpo.eval.metrics import reward_accuracy
    from qsimpo.generate import greedy_answers
    from qsimpo.response_logps import score_pairs

    scores = score_pairs(model, pairs, tokenizer.pad_token_id)
    gens = greedy_answers(model, tokenizer, prompts, 48, system_prompt)  # asked as training showed the rows
    return {
        "reward_accuracy": reward_accuracy(scores.chosen, scores.rejected),
        "mean_margin": beta * float((scores.chosen - scores.rejected).mean()),  # beta * delta, as training logs it
        "kind_style_rate": sum(map(is_kind, gens)) / len(gens),
        "generations": [{"prompt": p, "response": g} for p, g in zip(prompts, gens)],
    }


def run_quickstart(out: str | Path = "adapters/quickstart", overwrite: bool = False, seed: int = 0) -> dict:
    from qsimpo.data import build_dataset
    from qsimpo.train.model import load_trained
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    inputs = fingerprint(Path(__file__).with_name("tiny.yaml"), tiny=True, seed=seed)
    out, state, earlier = prepare_output(out, overwrite, inputs)
    if state == SHOW:
        say_earlier(out, state)
        show(earlier, out, state)
        return earlier
    t0 = time.perf_counter()
    train_topics, held_topics = TOPICS[:-HELDOUT_TOPICS], TOPICS[-HELDOUT_TOPICS:]
    data, heldout, base = out / "data" / "train.jsonl", out / "data" / "heldout.jsonl", out / "base"
    if state == NEW:
        record_start(out, inputs)
        train_rows = make_pairs(train_topics, 1200, seed)
        held_rows = make_pairs(held_topics, 200, seed + 1)
        write_jsonl(train_rows, data)
        write_jsonl(held_rows, heldout)

        say("[1/4] tokenizer and SFT warm-up of a tiny Llama-style model")
        texts = [r[k] for r in train_rows + held_rows for k in ("prompt", "chosen", "rejected")]
        tokenizer = build_tokenizer(texts, vocab_size=384)
        model = build_model(tokenizer, hidden_size=128, num_layers=2, num_heads=4, max_positions=256, seed=seed)
        supervised_warmup(model, tokenizer, train_rows + held_rows, steps=400, seed=seed)
        base = save_base(model, tokenizer, base)
    else:  # its data and SFT base were written before training began
        say_earlier(out, state)

    cfg = quickstart_config(out / "adapter", data, base, heldout)
    if state != REPORT:
        say("[2/4] QLoRA SimPO (NF4 base + LoRA) through `qsimpo train`")
        if state == RESUME:
            cfg.train.resume_from = "auto"
        train_resumably(cfg, f"qsimpo quickstart --tiny --out {out}")

    say("[3/4] held-out reward accuracy and generations, SFT (adapter off) vs aligned (adapter on)")
    model, tokenizer = load_trained(str(out / "adapter"))
    pairs, _ = build_dataset(cfg.data, tokenizer, path=str(heldout))
    prompts = [PROMPTS[i % len(PROMPTS)].format(t=t) for i, t in enumerate(held_topics)]
    with model.disable_adapter():
        before = probe(model, tokenizer, pairs, prompts, cfg.simpo.beta, cfg.data.system_prompt)
    after = probe(model, tokenizer, pairs, prompts, cfg.simpo.beta, cfg.data.system_prompt)
    result = {
        "held_out_pairs": len(pairs),
        "before": before,
        "after": after,
        "seconds": round(time.perf_counter() - t0, 1),
        "adapter": str(out / "adapter"),
        "base": str(base),
        "inputs": inputs,
    }
    (out / RECORD).write_text(json.dumps(result, indent=2) + "\n")
    say("[4/4] done")
    show(result, out, state)
    return result


def show(result: dict, out: Path, state: str = NEW) -> None:
    before, after = result["before"], result["after"]
    say(f"held-out reward accuracy: SFT {before['reward_accuracy']:.3f} -> aligned {after['reward_accuracy']:.3f}")
    say(f"courteous answers among {len(before['generations'])} greedy generations: SFT {before['kind_style_rate']:.0%} "
          f"-> aligned {after['kind_style_rate']:.0%}")
    pairs_shown = sorted(zip(before["generations"], after["generations"]), key=lambda ba: is_kind(ba[0]["response"]))
    for b, a in pairs_shown[:3]:  # the SFT model's rude answers first: that is what changed
        say(f"  {b['prompt']}\n    SFT:     {indent(b['response'], ' ' * 13)}\n    aligned: {indent(a['response'], ' ' * 13)}")
    say(show_footer(result, out, state))
