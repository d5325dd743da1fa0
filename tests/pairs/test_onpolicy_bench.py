"""benchmarks/onpolicy_prompts.py (held-out questions never trained on, instructions the scorer finds) and the
bookkeeping of benchmarks/bench_onpolicy.py (the slow test runs the whole runner on a tiny random base), and how
benchmarks/bench_family.py reads the comparison eval.json of its one `qsimpo eval` of every loss's adapter."""

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


# ------------------------------------------------------------------- benchmarks/bench_family.py's reading
def family_eval() -> dict:
    """A hand-made comparison eval.json (qsimpo eval simpo/adapter dpo/adapter): 4 held-out pairs, 3 prompts answered;
    the scorer section built by compare.py's own functions, so its keys are the ones eval writes."""
    from qsimpo.eval import metrics as M
    from qsimpo.eval.compare import comparison

    logp = {"sft": ([-1.0, -1.2, -0.8, -1.5], [-1.1, -1.0, -0.9, -1.4]),  # right on pairs 0 and 2
            "simpo/adapter": ([-0.9, -1.0, -0.7, -1.3], [-1.5, -1.6, -1.2, -1.8]),  # right on all; chosen up 0.1-0.2
            "dpo/adapter": ([-1.2, -1.5, -1.0, -1.6], [-1.1, -1.8, -1.3, -1.9])}  # wrong on pair 0; chosen down
    tokens = {"sft": [10, 12, 8], "simpo/adapter": [6, 7, 5], "dpo/adapter": [15, 14, 13]}
    scores = {"sft": [0.0, 0.5, 0.0], "simpo/adapter": [1.0, 1.0, 0.5], "dpo/adapter": [0.0, 0.5, 1.0]}
    found = [comparison(a, b, M.scored_answers(scores[b], scores[a], tokens[b], tokens[a], seed=0))
             for a, b in (("simpo/adapter", "sft"), ("dpo/adapter", "sft"), ("simpo/adapter", "dpo/adapter"))]
    return {"schema_version": 2, "kind": "comparison",
            "adapters": [{"name": "simpo/adapter", "adapter": "simpo/adapter", "loss": {"type": "simpo", "beta": 2.5},
                          "kl_from_sft": {"per_token": 0.05, "chosen": 0.04, "rejected": 0.06, "tokens": 100}},
                         {"name": "dpo/adapter", "adapter": "dpo/adapter", "loss": {"type": "dpo", "beta": 0.1},
                          "kl_from_sft": {"per_token": 0.2, "chosen": 0.1, "rejected": 0.3, "tokens": 100}}],
            "per_pair": {"location": [f"heldout.jsonl:{i + 1}" for i in range(4)], "chosen_len": [10, 20, 10, 20],
                         "rejected_len": [5, 5, 5, 5],
                         **{f"{m}_logp_{side}": v[k] for m, v in logp.items() for k, side in enumerate(("chosen", "rejected"))}},
            "generation": {"n": 3, "models": {m: M.generation_metrics(["x."] * 3, t, [True, True, m != "dpo/adapter"])
                                              for m, t in tokens.items()},
                           "samples": [{"prompt": f"q{k}", "tokens": {m: t[k] for m, t in tokens.items()},
                                        "scores": {m: s[k] for m, s in scores.items()}} for k in range(3)]},
            "scorer": {"spec": "qsimpo.pairs.examples:concise_complete", "comparisons": found}}


def test_family_reads_the_comparison_eval_per_loss(tmp_path, capsys):
    import bench_family

    path = tmp_path / "eval.json"
    path.write_text(json.dumps(family_eval()))
    ev, labels = bench_family.read_eval(path, ["dpo", "simpo"])  # the labels are found by loss, in the order asked
    assert labels == {"dpo": "dpo/adapter", "simpo": "simpo/adapter"}
    res = bench_family.results(ev, labels)
    assert list(res["losses"]) == ["dpo", "simpo"]
    simpo, dpo = res["losses"]["simpo"], res["losses"]["dpo"]
    assert simpo["accuracy"]["mean"] == 1.0 and dpo["accuracy"]["mean"] == 0.75 and res["sft"]["sft_accuracy"]["mean"] == 0.5
    assert dpo["accuracy"]["ci"][0] < 0.75 <= dpo["accuracy"]["ci"][1]
    assert simpo["chosen_change_avg"]["mean"] == pytest.approx(0.15) and simpo["chosen_change_sum"]["mean"] == pytest.approx(2.5)
    assert dpo["chosen_change_avg"]["mean"] == pytest.approx(-0.2) and dpo["chosen_change_sum"]["mean"] == pytest.approx(-3.0)
    assert dpo["chosen_change_avg"]["ci"][1] < 0  # likelihood displacement on every pair
    assert dpo["margin"]["mean"] == pytest.approx((-0.1 + 0.3 + 0.3 + 0.3) / 4)
    assert simpo["tokens"]["mean"] == 6.0 and dpo["tokens_change"]["mean"] == pytest.approx(4.0)
    assert res["sft"]["sft_tokens"]["mean"] == 10.0 and dpo["unfinished_rate"] == pytest.approx(1 / 3)
    assert simpo["kl_from_sft"]["per_token"] == 0.05 and dpo["kl_from_sft"]["per_token"] == 0.2
    assert simpo["wins"] == [3, 0, 0] and simpo["win_rate"] == 1.0
    assert dpo["wins"] == [1, 0, 2] and dpo["win_rate"] == pytest.approx(2 / 3)  # a tie counts half
    assert res["head_to_head"].keys() == {"simpo vs dpo"}
    assert res["head_to_head"]["simpo vs dpo"]["wins"] == [2, 1, 0]
    assert res["head_to_head"]["simpo vs dpo"]["win_rate"] == pytest.approx(2 / 3)
    bench_family.print_tables(res)
    out = capsys.readouterr().out
    assert "| dpo | 0.750 [" in out and "| simpo | 1.000 [1.000, 1.000] |" in out and "| simpo vs dpo | 0.667 [" in out
    assert "0.2000 | 14.0 (+4.000 [" in out and "4 held-out pairs, 3 prompts answered" in out


def test_family_runs_one_eval_and_refuses_what_it_cannot_read(tmp_path):
    import bench_family

    cmd = bench_family.eval_command(["simpo", "dpo"], 64, 8, None)
    assert cmd[:4] == ["qsimpo", "eval", "simpo/adapter", "dpo/adapter"] and cmd[-2:] == ["--generate", "8"]
    assert "--max-rows" not in cmd and cmd[cmd.index("--out") + 1] == "eval"
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"schema_version": 2, "per_pair": {}}))
    with pytest.raises(SystemExit, match="not the eval.json of several adapters"):
        bench_family.read_eval(one, ["simpo", "dpo"])
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(family_eval()))
    with pytest.raises(SystemExit, match="not one adapter for each of simpo, orpo"):
        bench_family.read_eval(path, ["simpo", "orpo"])
    with pytest.raises(SystemExit):
        bench_family.parse_args(["--losses", "simpo"])


def test_family_onpolicy_round_runs_commands_qsimpo_accepts(tmp_path, monkeypatch, capsys):
    """--onpolicy's `qsimpo pairs` and the trainings on its output are commands qsimpo takes as typed (--dry-run)."""
    import bench_family

    from qsimpo.cli import main

    monkeypatch.chdir(tmp_path)
    n_train, _ = bench_family.write_data(tmp_path)
    configs = bench_family.write_configs(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    pairs = bench_family.pairs_command(str(base), 4, 64, 48)
    assert pairs[:3] == ["qsimpo", "pairs", "train.jsonl"] and main(pairs[1:] + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "onpolicy.jsonl" in out and bench_family.SCORER in out and "48" in out
    (tmp_path / "onpolicy.jsonl").write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello there"}) + "\n")
    for loss in ("simpo", "dpo"):
        train = bench_family.train_command(loss, str(base), configs, 8, "onpolicy.jsonl")
        assert train[train.index("--data.path") + 1] == "onpolicy.jsonl"
        assert main(train[1:] + ["--dry-run"]) == 0
        assert "onpolicy.jsonl" in capsys.readouterr().out
