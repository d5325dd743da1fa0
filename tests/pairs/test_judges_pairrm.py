"""PairRM without its real weights: a tiny random checkpoint in LLM-Blender's layout, loaded by qsimpo.pairs.pairrm,
ranks answers exactly as LLM-Blender's own code (vendored in pairrm_reference.py) ranks them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pairrm_reference import load_reference, rank_reference, write_pairrm

PROMPTS = ["what is the sky", "why is water cold", "how to answer a question"]
ANSWERS = [["the sky is blue", "it is green", "blue because of water", "no", "the sky is the sky is blue [SEP] yes"],
           ["water is cold because it is", "cold", "it is not hot", "very cold water", "what"],
           ["answer it", "a good answer to the question", "ask why", "yes yes yes", "the answer is in the question"]]


@pytest.fixture(scope="module")
def pairrm(tmp_path_factory, one_thread):
    return write_pairrm(tmp_path_factory.mktemp("pairrm"))


@pytest.fixture(scope="module")
def short_pairrm(tmp_path_factory, one_thread):
    """The same layout with lengths small enough that the prompts and answers above are cut."""
    return write_pairrm(tmp_path_factory.mktemp("pairrm-short"), source_max=6, candidate_max=5, seed=1)


def user(text):
    return [{"role": "user", "content": text}]


def test_the_checkpoint_loads_with_no_missing_or_unexpected_keys(pairrm):
    from qsimpo.pairs.pairrm import PairRM, PairRMModel

    state = torch.load(pairrm / "pytorch_model.bin", weights_only=True)
    names = set(state) - {"pretrained_model.embeddings.position_ids"}  # a buffer transformers no longer keeps
    assert {"head_layer.1.weight", "head_layer.1.bias", "head_layer.4.weight", "head_layer.4.bias"} <= names
    judge = PairRM(str(pairrm), "cpu")
    assert isinstance(judge.model, PairRMModel) and set(judge.model.state_dict()) == names
    for name, value in judge.model.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert json.loads((pairrm / "config.json").read_text())["ranker_type"] == "pairranker"
    assert judge.tokenizer.convert_ids_to_tokens(list(judge.ids.values())) == list(judge.ids)  # the four prefixes


@pytest.mark.parametrize("fixture", ["pairrm", "short_pairrm"])
def test_scores_equal_llm_blenders(fixture, request):
    from qsimpo.pairs.pairrm import PairRM

    folder = request.getfixturevalue(fixture)
    expected = rank_reference(load_reference(folder), PROMPTS, ANSWERS)
    judge = PairRM(str(folder), "cpu")
    flat = [a for group in ANSWERS for a in group]
    got = judge([user(p) for p, g in zip(PROMPTS, ANSWERS) for _ in g], flat, ["here"] * len(flat), [5, 5, 5])
    np.testing.assert_allclose(np.array(got).reshape(3, 5), expected, rtol=0, atol=1e-5)
    assert all(max(g) - min(g) > 0.1 for g in np.array(got).reshape(3, 5))  # a judge that tells answers apart
    if fixture == "short_pairrm":  # every prompt is longer than 6 tokens with [CLS], <|source|> and [SEP]
        assert judge.truncated_prompts == 3 and judge.truncated_answers > 0
        assert "PairRM cut 3 prompts to 6 tokens" in judge.cut_line()
    else:
        assert judge.cut_line() is None


def test_ranking_does_not_depend_on_the_order_of_the_answers(pairrm):
    from qsimpo.pairs.pairrm import PairRM

    judge = PairRM(str(pairrm), "cpu")
    answers = ANSWERS[0]
    scores = judge([user(PROMPTS[0])] * 5, answers, ["here"] * 5)
    for perm in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        again = judge([user(PROMPTS[0])] * 5, [answers[i] for i in perm], ["here"] * 5)
        np.testing.assert_allclose(again, [scores[i] for i in perm], atol=1e-5)
        assert np.argmax(again) == perm.index(int(np.argmax(scores)))
        assert np.argmin(again) == perm.index(int(np.argmin(scores)))
    two = judge([user(PROMPTS[0])] * 2, answers[:2], ["here"] * 2)
    assert two[0] == pytest.approx(-two[1])  # two answers: one comparison, seen from both sides


def test_each_prompt_is_ranked_on_its_own(pairrm):
    """Scores of one prompt's answers do not depend on the other prompts scored in the same call."""
    from qsimpo.pairs.pairrm import PairRM

    judge = PairRM(str(pairrm), "cpu", max_rows=3)  # passes that mix prompts and pairs
    alone = judge([user(PROMPTS[1])] * 5, ANSWERS[1], ["here"] * 5)
    together = judge([user(p) for p, g in zip(PROMPTS, ANSWERS) for _ in g], [a for g in ANSWERS for a in g],
                     ["here"] * 15, [5, 5, 5])
    np.testing.assert_allclose(together[5:10], alone, atol=1e-5)


def test_a_folder_whose_config_says_pairranker_is_pairrm(pairrm):
    from qsimpo.pairs.pairrm import PairRM
    from qsimpo.pairs.scorers import load_scorer

    assert isinstance(load_scorer(str(pairrm)), PairRM)
    assert isinstance(load_scorer(f"pairrm:{pairrm}"), PairRM) and load_scorer(f"pairrm:{pairrm}").kind == "pairrm"


def test_pairrm_writes_its_scores_as_the_papers_rows(tiny_base, pairrm, tmp_path):
    """qsimpo pairs with PairRM as the judge: all_rm_scores are its scores of every sampled answer, best vs worst."""
    from qsimpo.pairs import make_pairs
    from qsimpo.pairs.pairrm import PairRM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "pairs.jsonl"
    summary = make_pairs(str(prompts), str(tiny_base), str(pairrm), str(out), n=4, max_new_tokens=6, seed=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs_written"] == len(rows) and len(rows) + sum(summary["dropped"].values()) == 3
    judge = PairRM(str(pairrm), "cpu")
    for row in rows:
        assert len(row["all_rm_scores"]) == len(row["all_generations"]) == 4
        alone = judge([user(row["prompt"])] * 4, row["all_generations"], ["here"] * 4)
        assert row["all_rm_scores"] == pytest.approx(alone, abs=1e-5)
        assert row["chosen"][-1]["content"] == row["all_generations"][int(np.argmax(alone))]
        assert row["rejected"][-1]["content"] == row["all_generations"][int(np.argmin(alone))]


def test_a_tie_is_dropped_and_counted():
    from qsimpo.pairs.write import pair_row

    row, reason = pair_row(user("q"), ["a", "b", "c"], [0.0, 0.0, 0.0])  # PairRM's scores of answers it cannot tell apart
    assert row is None and reason == "tie"


def test_pairrm_judges_eval_answers_two_at_a_time(pairrm):
    """qsimpo eval --scorer PairRM: each prompt's SFT and aligned answers are compared with each other."""
    from qsimpo.eval.judged import score_answers
    from qsimpo.pairs.pairrm import PairRM

    judge = PairRM(str(pairrm), "cpu")
    samples = [{"location": f"row {i}", "sft": ANSWERS[i][0], "aligned": ANSWERS[i][1], "sft_tokens": 3,
                "aligned_tokens": 4} for i in range(3)]
    section = score_answers(judge, {"samples": samples, "temperature": 0.0}, [user(p) for p in PROMPTS], seed=0, chunk=4)
    for i, s in enumerate(samples):
        pair = judge([user(PROMPTS[i])] * 2, ANSWERS[i][:2], ["here"] * 2)
        assert [s["sft_score"], s["aligned_score"]] == pytest.approx(pair, abs=1e-5)
    assert section["kind"] == "pairrm" and section["n"] == 3


def test_a_pairrm_config_without_weights_says_so(pairrm, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((pairrm / "config.json").read_text())
    from qsimpo.errors import InputNotFound
    from qsimpo.pairs.scorers import load_scorer

    with pytest.raises(InputNotFound, match="a PairRM config.json without its weights"):
        load_scorer(str(folder))


def test_what_pairrm_cut_is_in_the_summary(tiny_base, short_pairrm, tmp_path):
    from qsimpo.pairs import make_pairs

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n")
    summary = make_pairs(str(prompts), str(tiny_base), f"pairrm:{short_pairrm}", str(tmp_path / "p.jsonl"), n=2,
                         max_new_tokens=6)
    assert summary["judge_cut"].startswith("PairRM cut 1 prompts to 6 tokens") and summary["judge_cut"] in summary["line"]


def test_pairrm_prefix_on_something_else_says_what_is_needed(tiny_base):
    from qsimpo.errors import UsageError
    from qsimpo.pairs.scorers import load_scorer

    with pytest.raises(UsageError, match=r"no PairRM here \(its config.json does not say ranker_type"):
        load_scorer(f"pairrm:{tiny_base}")
