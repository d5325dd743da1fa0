"""How qsimpo/quickstart/data/pairs.jsonl was made: SmolLM2-135M-Instruct's own answers, cut to one sentence.

    python tools/make_quickstart_data.py [--out qsimpo/quickstart/data/pairs.jsonl]

For each question (topics x phrasings below) the model answers greedily. The pair prefers the
answer's first sentence, closed there (chosen), to the whole answer (rejected): both are the
model's own text, so what SimPO has to learn is one visible habit, to stop after a sentence.
Questions whose answer is a single sentence, or whose first sentence is under 5 words, are left out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TOPICS = [
    "volcanoes", "the moon", "photosynthesis", "honeybees", "glaciers", "the internet", "rainbows", "earthquakes",
    "coffee", "the human heart", "black holes", "electricity", "the Roman Empire", "penguins", "tides", "vaccines",
    "chess", "the printing press", "deserts", "coral reefs", "thunderstorms", "bread", "the piano", "magnets",
    "dinosaurs", "the Amazon rainforest", "solar panels", "owls", "the Great Wall of China", "bicycles", "tea",
    "the immune system", "comets", "recycling", "the Olympic Games", "sharks", "clouds", "batteries", "maps",
    "the Eiffel Tower", "mushrooms", "the stock market", "lighthouses", "octopuses", "gravity", "rivers", "vitamins",
    "the violin", "airplanes", "snowflakes", "the Sahara", "whales", "democracy", "cheese", "the brain", "lightning",
    "trains", "bamboo", "the ocean", "eclipses", "ants", "mountains", "the telescope", "wind turbines", "sleep",
    "paper", "the Nile", "butterflies", "the compass", "chocolate", "fire", "the sun", "caves", "libraries",
    "elephants", "the alphabet", "soap", "hurricanes", "calendars", "wolves",
]
PHRASINGS = ["What are {t}?", "Tell me about {t}.", "Why are {t} important?"]
SENTENCE = re.compile(r"^(.+?[.!?])(\s+|$)", re.S)


def questions() -> list[tuple[str, str]]:
    """(topic, question) for every topic and phrasing, topic by topic."""
    out = []
    for t in TOPICS:
        for p in PHRASINGS:
            q = p.format(t=t)
            if t.startswith("the ") or not t.endswith("s"):  # "What is the moon?" reads better than "What are"
                q = q.replace("What are", "What is").replace("Why are", "Why is")
            out.append((t, q[0].upper() + q[1:]))
    return out


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsimpo.realmodel import smollm2_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="qsimpo/quickstart/data/pairs.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=72)
    ap.add_argument("--batch-size", type=int, default=24)
    args = ap.parse_args()
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    qs = questions()
    rows = []
    for i in range(0, len(qs), args.batch_size):
        batch = qs[i:i + args.batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for _, q in batch]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for (topic, q), ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            answer = tok.decode(ids, skip_special_tokens=True).strip()
            m = SENTENCE.match(answer)
            if not m or len(m.group(1).split()) < 5 or m.group(1).strip() == answer:
                continue
            if len(tok(answer)["input_ids"]) >= args.max_new_tokens:  # cut mid-sentence: end at its last full sentence
                answer = answer[: max(answer.rfind(". "), answer.rfind("! "), answer.rfind("? ")) + 1] or answer
            if m.group(1).strip() == answer:
                continue
            rows.append({"topic": topic, "prompt": q, "chosen": m.group(1).strip(), "rejected": answer})
        print(f"{i + len(batch)}/{len(qs)} questions, {len(rows)} pairs", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
