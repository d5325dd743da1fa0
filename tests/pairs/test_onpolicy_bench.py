"""benchmarks/onpolicy_prompts.py (held-out questions never trained on, instructions the scorer finds) and the
bookkeeping of benchmarks/bench_onpolicy.py; the slow test runs the whole runner on a tiny random base."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_onpolicy  # noqa: E402
from onpolicy_prompts import QUESTIONS, main as prompts_main, make_prompts  # noqa: E402

from qsimpo.pairs.examples import CONFLICTS, find_instructions  # noqa: E402


def question_of(prompt: str) -> str:
    return next(q for q in QUESTIONS if prompt.startswith(q + " "))


def test_prompts_hold_out_whole_questions_and_carry_one_or_two_instructions():
    train, held = make_prompts(heldout=20, variants=2, seed=0)
    assert len(held) == 20 and len(train) == 2 * (len(QUESTIONS) - 20)
    assert len(set(QUESTIONS)) == len(QUESTIONS) == 60
    train_q, held_q = {question_of(p) for p in train}, {question_of(p) for p in held}
    assert not train_q & held_q and len(held_q) == 20 and len(train_q) == 40
    assert len(set(train)) == len(train)  # a question's two variants differ
    kinds = set()
    for p in train + held:
        found = [i.name for i, _ in find_instructions(p[len(question_of(p)):])]
        assert found == [i.name for i, _ in find_instructions(p)]  # no question reads as an instruction
        assert 1 <= len(found) <= 2 and frozenset(found) not in CONFLICTS
        kinds.update(found)
    assert len(kinds) >= 8  # the draw reaches (nearly) every instruction
    assert make_prompts(20, 2, 0) == (train, held) and make_prompts(20, 2, 1) != (train, held)


def test_prompts_script_writes_both_files_and_refuses_bad_sizes(tmp_path, capsys):
    prompts_main(["--out-dir", str(tmp_path), "--heldout", "10", "--variants", "1"])
    rows = [json.loads(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and set(rows[0]) == {"prompt"}
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 50
    with pytest.raises(SystemExit, match="--heldout 60: give a number between 1 and 59"):
        make_prompts(60, 1, 0)
    with pytest.raises(SystemExit, match="--variants 0"):
        make_prompts(10, 0, 0)


def test_pairs_summary_counts_pairs_drops_and_scores(tmp_path):
    out = tmp_path / "pairs.jsonl"
    out.write_text(json.dumps({"all_rm_scores": [1.0, 0.0, 0.5]}) + "\n" + json.dumps({"all_rm_scores": [0.5, -1.0]}) + "\n")
    Path(f"{out}.dropped.jsonl").write_text(json.dumps({"reason": "tie", "all_rm_scores": [0.5, 0.5]}) + "\n"
                                            + json.dumps({"reason": "identical_samples"}) + "\n")
    s = bench_onpolicy.pairs_summary(out)
    assert s["pairs"] == 2 and s["dropped"] == {"tie": 1, "identical_samples": 1}
    assert s["mean_chosen"] == 0.75 and s["mean_rejected"] == -0.5
    assert s["mean_sample_score"] == pytest.approx(sum([1, 0, 0.5, 0.5, -1, 0.5, 0.5]) / 7)


def test_answer_checks_and_round_comparison():
    p1, p2 = "Name a fruit. Do not use any commas.", "Name a tree. Answer in at most 3 words. Include the word 'tall'."
    samples = [{"prompt": p1, "sft": "Apples, pears, figs.", "aligned": "Apples are a sweet fruit.", "sft_score": 0.0, "aligned_score": 1.0,
                "sft_tokens": 4, "aligned_tokens": 4},
               {"prompt": p2, "sft": "Oak", "aligned": "A tall tree", "sft_score": -1.0, "aligned_score": 0.75,
                "sft_tokens": 1, "aligned_tokens": 3}]
    sft = bench_onpolicy.answer_checks(samples, "sft")
    assert sft["followed"] == {"include_word": [0, 1], "max_words": [1, 1], "no_commas": [0, 1]}
    assert sft["all_followed"] == 0 and sft["under_min_words"] == 1 and sft["unfinished"] == 1 and sft["off_topic"] == 2  # "Oak" and "Apples, pears, figs." name no fruit or tree
    aligned = bench_onpolicy.answer_checks(samples, "aligned")
    assert aligned["all_followed"] == 2 and aligned["under_min_words"] == 0 and aligned["unfinished"] == 1
    assert aligned["off_topic"] == 0
    d = bench_onpolicy.paired_difference([1.0, 0.75], [0.0, -1.0])
    assert d["mean"] == pytest.approx(1.375) and d["ci"][0] <= 1.375 <= d["ci"][1]
    ev1 = {"generation": {"samples": samples}}
    later = [{**s, "aligned_score": s["aligned_score"] + 0.25, "aligned_tokens": 2} for s in samples]
    c = bench_onpolicy.between_rounds(ev1, {"generation": {"samples": later}})
    assert c["wins"] == 2 and c["round2_win_rate"] == 1.0 and c["score_difference"]["mean"] == pytest.approx(0.25)
    with pytest.raises(SystemExit, match="different prompts"):
        bench_onpolicy.between_rounds(ev1, {"generation": {"samples": later[::-1]}})


@pytest.mark.slow
def test_the_runner_on_a_tiny_base(tmp_path):
    """Both rounds of real commands on a tiny random model: the row has every step's time and the eval's numbers."""
    results = tmp_path / "results.jsonl"
    bench_onpolicy.main(["--tiny", "--work", str(tmp_path / "work"), "--steps", "2", "--heldout", "4", "--variants", "1",
                         "--n", "3", "--max-new-tokens", "16", "--results", str(results)])
    row = json.loads(results.read_text())
    assert row["base"] == "tiny" and len(row["rounds"]) == 2 and len(row["commands"]) == 6
    assert row["commands"][3].startswith("qsimpo pairs train.jsonl --model round1/adapter ")
    for r in row["rounds"]:
        assert set(r["seconds"]) == set(r["cpu_seconds"]) == {"pairs", "train", "eval", "round"}
        assert r["training"]["steps"] == 2
        cpu = r["cpu_seconds"]
        assert cpu["pairs"] > 0 and cpu["round"] == pytest.approx(cpu["pairs"] + cpu["train"] + cpu["eval"], abs=0.2)
        assert r["eval"]["n"] == 4 and len(r["eval"]["examples"]) == 3
    assert row["round2_vs_round1"]["wins"] + row["round2_vs_round1"]["losses"] + row["round2_vs_round1"]["ties"] == 4
