"""Prompts with checkable instructions for the on-policy round (benchmarks/bench_onpolicy.py).

    python benchmarks/onpolicy_prompts.py --out-dir work/onpolicy [--heldout 20] [--variants 2] [--seed 0]

Writes train.jsonl and heldout.jsonl, one {"prompt": ...} per line: an everyday question followed by
one or two instructions that qsimpo.pairs.examples:follows_instructions checks ("Answer in at most 25
words.", "Do not use any commas.", ...), drawn from its INSTRUCTIONS with the seed. The questions are
split once, so no held-out prompt shares its question with a training prompt; each training question
appears ``--variants`` times, with different instructions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from qsimpo.pairs.examples import CONFLICTS, INSTRUCTIONS

QUESTIONS = [
    "How do I boil an egg so the yolk stays soft?",
    "What should I pack for a weekend camping trip?",
    "How can I fall asleep faster at night?",
    "Why do leaves change colour in autumn?",
    "How often should I water a cactus?",
    "What is a good way to start running as a beginner?",
    "How do I remove a coffee stain from a shirt?",
    "What are some tips for saving money on groceries?",
    "How can I keep my houseplants alive while on holiday?",
    "Why is it important to drink water during the day?",
    "How do I make a simple tomato pasta sauce?",
    "What can I do on a rainy afternoon with children?",
    "How do I write a polite email asking for a day off?",
    "Why do cats purr?",
    "How can I make my small apartment feel bigger?",
    "What should I look for when buying a used bicycle?",
    "How do I clean a cast iron pan?",
    "What is the best way to learn new words in a foreign language?",
    "How can I stay focused while working from home?",
    "Why does bread go stale?",
    "How do I choose a ripe avocado?",
    "What are easy ways to reduce plastic waste at home?",
    "How do I prepare for a job interview?",
    "Why is the sea salty?",
    "How can I keep my phone battery healthy?",
    "What should I do if I lock myself out of my house?",
    "How do I make a cup of tea properly?",
    "What are good habits for a healthy morning routine?",
    "How do I fix a squeaky door hinge?",
    "Why do we get hiccups?",
    "How do I plan a birthday party for a friend?",
    "What are some ways to stay warm in winter without heating?",
    "How do I teach a dog to sit?",
    "Why do onions make people cry?",
    "How can I remember people's names better?",
    "What should I bring to a picnic?",
    "How do I keep cut flowers fresh longer?",
    "Why does ice float on water?",
    "How can I improve my handwriting?",
    "What is a simple way to start a vegetable garden?",
    "How do I unclog a bathroom sink?",
    "Why do we have leap years?",
    "How can I make new friends in a new city?",
    "What should I eat before a long hike?",
    "How do I store fresh herbs?",
    "Why is exercise good for mood?",
    "How do I organise a messy wardrobe?",
    "What are some fun things to do at the beach?",
    "How do I care for a pair of leather shoes?",
    "Why do bees make honey?",
    "How can I drink less coffee?",
    "What is a good gift for a coworker who is leaving?",
    "How do I bake simple banana bread?",
    "Why do stars twinkle?",
    "How can I be more patient with my kids?",
    "What should I do before going on a long car trip?",
    "How do I keep fruit flies out of my kitchen?",
    "Why do we yawn?",
    "How do I start reading more books?",
    "What is a quick and healthy lunch idea?",
]


def instructions_for(rng: random.Random) -> list[str]:
    """One or two instructions, never two of one kind or a pair in CONFLICTS, each with a drawn parameter."""
    while True:
        chosen = rng.sample(INSTRUCTIONS, rng.choice((1, 2)))
        if len(chosen) == 1 or frozenset(i.name for i in chosen) not in CONFLICTS:
            return [i.phrase(rng.choice(i.values) if i.values else None) for i in chosen]


def make_prompts(heldout: int, variants: int, seed: int) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): the questions shuffled with ``seed`` and split, then given instructions."""
    if not 0 < heldout < len(QUESTIONS):
        raise SystemExit(f"--heldout {heldout}: give a number between 1 and {len(QUESTIONS) - 1} "
                         f"(there are {len(QUESTIONS)} questions)")
    if variants < 1:
        raise SystemExit(f"--variants {variants}: give a whole number >= 1")
    rng = random.Random(seed)
    questions = rng.sample(QUESTIONS, len(QUESTIONS))
    held, train = questions[:heldout], questions[heldout:]
    held_prompts = [f"{q} {' '.join(instructions_for(rng))}" for q in held]
    train_prompts = []
    for q in train:
        seen: set[str] = set()
        while len(seen) < variants:  # distinct instruction sets for one question
            prompt = f"{q} {' '.join(instructions_for(rng))}"
            if prompt not in seen:
                seen.add(prompt)
                train_prompts.append(prompt)
    return train_prompts, held_prompts


def write(path: Path, prompts: list[str]) -> None:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True, help="folder for train.jsonl and heldout.jsonl")
    p.add_argument("--heldout", type=int, default=20, help="questions kept for held-out prompts (default: 20)")
    p.add_argument("--variants", type=int, default=2, help="prompts per training question (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, held = make_prompts(args.heldout, args.variants, args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.jsonl", train)
    write(out / "heldout.jsonl", held)
    print(f"{len(train)} train prompts ({len(QUESTIONS) - args.heldout} questions x {args.variants}) -> {out / 'train.jsonl'}; "
          f"{len(held)} held-out prompts -> {out / 'heldout.jsonl'}")


if __name__ == "__main__":
    main()
