"""Answers scored per second by each kind of `--scorer` judge, on the CPU, at small real shapes with random weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_judges.py                 # minutes on one free core
    OMP_NUM_THREADS=1 python benchmarks/bench_judges.py --prompts 2 --answers 5

Judges (random weights: the speed of a model does not depend on what it learned):

- python        qsimpo.pairs.examples:concise_complete, a rule-based function
- reward_model  a LlamaForSequenceClassification at SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads),
                padded passes sized by memory (qsimpo.pairs.judges)
- custom_code   the same body behind its own modelling file (auto_map, --trust-remote-code), ArmoRM's gated
                head; passes of equal-length answers only
- pairrm        PairRM's real body, DeBERTa-v3-large (24 layers, hidden 1024, 16 heads), with a small vocabulary
                (the embedding's size does not change the speed); N answers cost N(N-1) passes; one prompt

Each judge scores the same ``--prompts`` x ``--answers`` answers once after a warm-up call; answers are
60-140 words. Appends one JSON row per run to ``--results``; RESULTS.md is written by hand from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "pairs"))  # the test checkpoints' builders

WORDS = ("the a is of and to in what how why answer question water sky blue green cold hot because it not very "
         "much more less good bad yes no light air owl night bird eyes hunt small animals keep phone battery").split()


def texts(prompts: int, answers: int, seed: int = 0):
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."  # noqa: E731
    asked = [[{"role": "user", "content": say(10, 30)}] for _ in range(prompts)]
    return asked, [[say(60, 140) for _ in range(answers)] for _ in range(prompts)]


def build_reward_models(root: Path, corpus: list[str]) -> tuple[Path, Path]:
    from test_judges_models import MODELING_CUSTOM
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from qsimpo.quickstart.toy import build_tokenizer

    tok = build_tokenizer(corpus, vocab_size=400)
    shape = dict(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    plain = root / "reward-model"
    LlamaForSequenceClassification(LlamaConfig(num_labels=1, **shape)).save_pretrained(plain)
    tok.save_pretrained(plain)
    custom = root / "custom-code"
    custom.mkdir()
    (custom / "modeling_custom.py").write_text(MODELING_CUSTOM)
    sys.path.insert(0, str(custom))
    from modeling_custom import TinyRewardWithGating

    config = LlamaConfig(num_objectives=19, **shape)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_custom.TinyRewardWithGating"}
    config.architectures = ["TinyRewardWithGating"]
    TinyRewardWithGating(config).save_pretrained(custom)
    config.save_pretrained(custom)
    tok.save_pretrained(custom)
    return plain, custom


def build_pairrm(root: Path) -> Path:
    """PairRM's layout around a DeBERTa-v3-large body; the backbone folder holds only its config (all qsimpo reads)."""
    from pairrm_reference import RANKER_CONFIG, tiny_tokenizer
    from transformers import DebertaV2Config

    from qsimpo.pairs.pairrm import CAND, CAND1, CAND2, DEBERTA_V3_LARGE, SOURCE, PairRMModel

    tok = tiny_tokenizer()
    tok.add_tokens([SOURCE, CAND1, CAND2, CAND])
    config = DebertaV2Config(**{**{k: v for k, v in DEBERTA_V3_LARGE.items() if k != "model_type"}, "vocab_size": len(tok)})
    backbone, folder = root / "deberta-v3-large-shape", root / "pairrm"
    config.save_pretrained(backbone)
    torch.manual_seed(0)
    model = PairRMModel(config, 1, 0.05)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(RANKER_CONFIG, model_name=str(backbone))))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tok.save_pretrained(folder)
    return folder


def measure(judge, prompts, answers) -> dict:
    sizes = [len(a) for a in answers]
    flat_prompts = [p for p, a in zip(prompts, answers) for _ in a]
    flat = [x for a in answers for x in a]
    judge(flat_prompts[:2], flat[:2], ["warm-up"] * 2, [2])  # two answers to the first prompt: one pair for PairRM
    t0 = time.perf_counter()
    judge(flat_prompts, flat, ["bench"] * len(flat), sizes)
    seconds = time.perf_counter() - t0
    return {"answers": len(flat), "seconds": round(seconds, 3), "answers_per_s": round(len(flat) / seconds, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--answers", type=int, default=5)
    ap.add_argument("--pairrm-answers", type=int, default=3, help="answers per prompt for PairRM (N(N-1) passes)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results_judges.jsonl"))
    args = ap.parse_args()

    from qsimpo.pairs.scorers import load_scorer

    prompts, answers = texts(args.prompts, args.answers)
    corpus = [m["content"] for p in prompts for m in p] + [a for g in answers for a in g]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain, custom = build_reward_models(root, corpus)
        pairrm = build_pairrm(root)
        specs = {"python": "qsimpo.pairs.examples:concise_complete", "reward_model": str(plain),
                 "custom_code": str(custom), "pairrm": str(pairrm)}
        for kind, spec in specs.items():
            judge = load_scorer(spec, "cpu", trust_remote_code=kind == "custom_code")
            if kind == "pairrm":
                rows[kind] = measure(judge, prompts[:1], [answers[0][:args.pairrm_answers]])  # one prompt: slow
                rows[kind]["passes"] = args.pairrm_answers * (args.pairrm_answers - 1)
            else:
                rows[kind] = measure(judge, prompts, answers)
            print(f"{kind:13s} {rows[kind]['answers']:3d} answers in {rows[kind]['seconds']:8.2f} s: "
                  f"{rows[kind]['answers_per_s']:9.2f} answers/s", flush=True)
            del judge
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "prompts": args.prompts, "answers": args.answers, "judges": rows}
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
