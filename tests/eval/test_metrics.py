"""qsimpo.eval.metrics on hand-built cases whose answers are known, with the arithmetic written out."""

import math

import pytest
import torch

from qsimpo.eval import metrics as M

T = torch.tensor


def test_reward_accuracy_three_of_four_and_ties_count_as_misses():
    # pairs 0, 1, 3 prefer chosen; pair 2 prefers rejected  -> 3/4
    chosen, rejected = T([-0.1, -0.5, -2.0, -1.0]), T([-0.2, -0.9, -1.0, -3.0])
    assert M.reward_accuracy(chosen, rejected) == 0.75
    # a tie is not a win, as in the trainer's rewards/accuracies: (1 + 0) / 2
    assert M.reward_accuracy(T([-1.0, -1.0]), T([-2.0, -1.0])) == 0.5


def test_margins_are_beta_times_the_average_logp_difference():
    m = M.reward_margins(T([-0.5, -1.0]), T([-1.0, -0.75]), beta=2.0)
    assert m.tolist() == [1.0, -0.5]  # 2·(−0.5 + 1.0), 2·(−1.0 + 0.75)


def test_preference_metrics_simpo_loss_written_out():
    # one pair: β = 2, γ = 0.5, Δ = −0.5 − (−1.0) = 0.5  ->  loss = −log σ(2·0.5 − 0.5) = −log σ(0.5)
    m = M.preference_metrics(T([-0.5]), T([-1.0]), T([3]), T([4]), beta=2.0, gamma=0.5)
    assert m["simpo_loss"] == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))))
    assert m["loss"] == pytest.approx(m["simpo_loss"])  # no options: the run's loss is the paper's
    assert m["reward_margin_mean"] == pytest.approx(1.0)
    assert m["reward_chosen_mean"] == pytest.approx(-1.0) and m["reward_rejected_mean"] == pytest.approx(-2.0)
    # with the CPO-SimPO NLL term λ = 3: + λ·(−avg_logp(chosen)) = + 1.5
    with_sft = M.preference_metrics(T([-0.5]), T([-1.0]), T([3]), T([4]), beta=2.0, gamma=0.5, sft_weight=3.0)
    assert with_sft["loss"] == pytest.approx(m["simpo_loss"] + 1.5)
    assert with_sft["simpo_loss"] == pytest.approx(m["simpo_loss"])


def test_spearman_exactly_one_minus_one_and_undefined():
    # avg log-prob rises with length (not linearly): the ranks agree exactly
    assert M.spearman([1, 2, 3, 4, 5], [-5.0, -2.0, -1.5, -0.2, -0.1])["rho"] == pytest.approx(1.0)
    assert M.spearman([1, 2, 3, 4], [4.0, 3.0, 1.0, 0.5])["rho"] == pytest.approx(-1.0)
    assert M.spearman([3, 3, 3], [1.0, 2.0, 3.0]) == {"rho": None, "p_value": None, "n": 3}  # constant lengths
    # pooled over chosen and rejected responses: lengths 1..4 with log-probs in the same order
    s = M.length_logp_spearman(T([-4.0, -2.0]), T([-3.0, -1.0]), T([1, 3]), T([2, 4]))
    assert s["rho"] == pytest.approx(1.0) and s["n"] == 4


def test_accuracy_by_length_and_prefers_longer():
    # a model that simply prefers the longer response:
    #   pair 0: chosen longer,  chosen scored higher  -> correct, favours longer
    #   pair 1: chosen longer,  chosen scored higher  -> correct, favours longer
    #   pair 2: chosen shorter, rejected scored higher -> wrong,  favours longer
    #   pair 3: same length,    chosen scored higher  -> correct
    chosen, rejected = T([-1.0, -1.0, -2.0, -1.0]), T([-2.0, -2.0, -1.0, -2.0])
    c_len, r_len = T([10, 12, 5, 7]), T([5, 6, 9, 7])
    by = M.accuracy_by_length(chosen, rejected, c_len, r_len)
    assert by == {"chosen_longer": {"n": 2, "accuracy": 1.0}, "chosen_shorter": {"n": 1, "accuracy": 0.0},
                  "same_length": {"n": 1, "accuracy": 1.0}}
    assert M.prefers_longer(chosen, rejected, c_len, r_len) == {"n": 3, "rate": 1.0}
    # the opposite model: always the shorter one
    assert M.prefers_longer(rejected, chosen, c_len, r_len) == {"n": 3, "rate": 0.0}
    assert M.prefers_longer(chosen, rejected, r_len, r_len) == {"n": 0, "rate": None}


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        M.reward_accuracy(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        M.reward_accuracy(torch.zeros(0), torch.zeros(0))


def test_distinct_2_and_repetition_rate():
    # "a b a b" -> bigrams ab, ba, ab ; "c d" -> cd  => 3 distinct of 4
    assert M.distinct_n(["a b a b", "c d"], 2) == 0.75
    assert M.distinct_n(["a", ""], 2) is None
    # "a b c a b c a b c": 7 trigrams, 3 distinct -> 4/7 repeated; "x y z w": 0  => mean 2/7
    assert M.repetition_rate(["a b c a b c a b c", "x y z w"], 3) == pytest.approx((4 / 7 + 0) / 2)
    assert M.repetition_rate(["too short"], 3) is None
    g = M.generation_metrics(["a b c", "", "d e f g h"], [4, 0, 6], [True, True, False])
    assert g["mean_length_tokens"] == pytest.approx(10 / 3)
    assert g["unfinished_rate"] == pytest.approx(1 / 3) and g["empty_rate"] == pytest.approx(1 / 3)


def test_wilson_interval_matches_scipy():
    from scipy.stats import binomtest

    for k, n in [(0, 10), (7, 10), (10, 10), (37, 50), (1, 3)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert M.wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    with pytest.raises(ValueError, match="successes"):
        M.wilson_interval(11, 10)


def test_win_rate_counts_ties_as_half():
    # aligned vs SFT: win, win, loss, tie  -> (2 + 0.5) / 4
    w = M.win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 1.0, 5.0])
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (2, 1, 1, 4)
    assert w["win_rate"] == 0.625
    assert w["ci_low"] < 0.625 < w["ci_high"]
    assert (w["ci_low"], w["ci_high"]) == pytest.approx(M.wilson_interval(2.5, 4))
