"""qsimpo.eval.metrics on hand-built cases whose answers are known, with the arithmetic written out."""

import math

import numpy as np
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


def test_win_rate_counts_ties_as_half():
    # aligned vs SFT: win, win, loss, tie  -> (2 + 0.5) / 4
    w = M.win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 1.0, 5.0])
    assert w == {"n": 4, "wins": 2, "losses": 1, "ties": 1, "win_rate": 0.625}
    assert M.outcomes([1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 1.0, 5.0]).tolist() == [1.0, 1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="equally long"):
        M.win_rate([1.0], [1.0, 2.0])


def two_groups():
    """Wins explained by length: aligned 20 tokens longer on 20 prompts (16 wins, 4 losses), 20 shorter on 5 (1 win, 4
    losses). Raw win rate 17/25 = 0.68; the log-odds at ±20 tokens are ±log 4, so at equal length they are 0: 0.5."""
    aligned = [1.0] * 16 + [0.0] * 4 + [1.0] + [0.0] * 4
    sft = [0.5] * 25
    aligned_len, sft_len = [30] * 20 + [10] * 5, [10] * 20 + [30] * 5
    return aligned, sft, aligned_len, sft_len


def test_lc_win_rate_removes_the_wins_length_explains():
    aligned, sft, a_len, s_len = two_groups()
    assert M.win_rate(aligned, sft)["win_rate"] == 0.68
    exact = M.lc_win_rate(aligned, sft, a_len, s_len, l2=0.0)  # unpenalised: the saturated two-group fit, written out
    assert exact["lc_win_rate"] == pytest.approx(0.5, abs=1e-9) and exact["fallback"] is None
    sd = np.std(np.array(a_len) - np.array(s_len))  # z = ±20 / sd; the slope is log 4 per 20 / sd
    assert exact["slope"] == pytest.approx(math.log(4) * sd / 20, abs=1e-9)
    ridge = M.lc_win_rate(aligned, sft, a_len, s_len)  # the default weak ridge barely moves it
    assert ridge["lc_win_rate"] == pytest.approx(0.5, abs=0.02) and ridge["slope"] > 0
    # the reverse: longer answers win half the time (10 prompts), shorter ones 3 of 4: raw 8/14, and at equal length
    # the log-odds are halfway between 0 and log 3, so controlling for length raises the win rate to σ(log 3 / 2)
    flipped = M.lc_win_rate([1.0] * 5 + [0.0] * 5 + [1.0] * 3 + [0.0], [0.5] * 14, [30] * 10 + [10] * 4,
                            [10] * 10 + [30] * 4, l2=0.0)
    assert flipped["lc_win_rate"] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)), abs=1e-9)
    assert flipped["lc_win_rate"] > 8 / 14 and flipped["slope"] < 0


def test_lc_win_rate_equals_the_win_rate_when_lengths_do_not_explain_anything():
    # equal lengths everywhere: nothing to control for (fallback), LC is the win rate with ties as half
    lc = M.lc_win_rate([1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 1.0, 5.0], [7, 3, 9, 4], [7, 3, 9, 4])
    assert lc["lc_win_rate"] == 0.625 and lc["slope"] == 0.0 and "length difference is the same" in lc["fallback"]
    # the same difference everywhere cannot be told from the intercept either
    assert M.lc_win_rate([1, 0, 1], [0, 1, 0], [5, 6, 7], [1, 2, 3])["lc_win_rate"] == pytest.approx(2 / 3)
    # all ties: σ(0) = 0.5; all wins: 1.0, with no infinite intercept
    assert M.lc_win_rate([2, 2], [2, 2], [1, 9], [4, 4]) == {"lc_win_rate": 0.5, "slope": 0.0,
                                                            "fallback": "every prompt has the same outcome: the plain "
                                                                        "win rate is reported"}
    assert M.lc_win_rate([3, 3, 3], [1, 1, 1], [9, 1, 5], [2, 2, 2])["lc_win_rate"] == 1.0
    # length unrelated to the outcome (longer and shorter each win once and lose once; a win and a tie at equal length):
    # the slope is 0 and the fit's intercept is the log-odds of the mean outcome, so LC is the win rate, 3.5 / 6
    lc = M.lc_win_rate([1, 0, 1, 0, 1, 0.5], [0, 1, 0, 1, 0, 0.5], [12, 12, 2, 2, 7, 7], [2, 2, 12, 12, 7, 7])
    assert lc["lc_win_rate"] == pytest.approx(3.5 / 6, abs=1e-9) and lc["slope"] == pytest.approx(0, abs=1e-9)
    assert lc["fallback"] is None


def test_lc_fit_matches_a_general_optimiser_and_stays_finite_when_length_separates():
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    d = rng.normal(5, 20, 300)
    y = (rng.random(300) < 1 / (1 + np.exp(-(0.4 + 0.04 * d)))).astype(float)
    y[rng.random(300) < 0.1] = 0.5
    z = d / d.std()

    def loss(t):
        p = 1 / (1 + np.exp(-(t[0] + t[1] * z)))
        return -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum() + M.LC_SLOPE_L2 / 2 * t[1] ** 2

    best = minimize(loss, [0.0, 0.0], method="BFGS", options={"gtol": 1e-9}).x
    lc = M.lc_win_rate(y, np.full(300, 0.5), d, np.zeros(300))
    assert lc["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-best[0])), abs=1e-6)
    assert lc["slope"] == pytest.approx(best[1], abs=1e-5)
    # wins exactly where the aligned answer is longer: no finite MLE; the ridge keeps the fit finite
    sep = M.lc_win_rate([1] * 5 + [0] * 5, [0.5] * 10, [20] * 5 + [5] * 5, [10] * 10)
    assert 0 < sep["lc_win_rate"] < 1 and 0 < sep["slope"] < 20


def test_scored_answers_bootstrap_intervals_contain_the_estimates_and_are_seeded():
    aligned, sft, a_len, s_len = two_groups()
    sft = [0.5 + 0.1 * (i % 3) for i in range(25)]  # SFT's scores vary too: 0.5, 0.6, 0.7
    got = M.scored_answers(sft, aligned, s_len, a_len, seed=7)
    assert got["n"] == 25 and got["resamples"] == M.BOOTSTRAP_RESAMPLES and got["seed"] == 7
    assert got["mean_score"]["sft"] == pytest.approx(np.mean(sft)) and got["mean_score"]["aligned"] == 17 / 25
    assert (got["wins"], got["losses"], got["ties"]) == (17, 8, 0) and got["win_rate"] == 0.68
    assert got["mean_length_tokens"] == {"sft": 14.0, "aligned": 26.0}
    assert got["lc_win_rate"] == M.lc_win_rate(aligned, sft, a_len, s_len)["lc_win_rate"]
    for est, (low, high) in [(got["mean_score"]["sft"], got["mean_score_ci"]["sft"]),
                             (got["mean_score"]["aligned"], got["mean_score_ci"]["aligned"]),
                             (got["win_rate"], got["win_rate_ci"]), (got["lc_win_rate"], got["lc_win_rate_ci"])]:
        assert low < est < high
    assert got == M.scored_answers(sft, aligned, s_len, a_len, seed=7)  # the same seed, the same intervals
    assert got["lc_win_rate_ci"] != M.scored_answers(sft, aligned, s_len, a_len, seed=8)["lc_win_rate_ci"]
    # the interval is the percentile interval of the statistic over the seeded resamples
    idx = M.resample_indices(25, M.BOOTSTRAP_RESAMPLES, 7)
    y = M.outcomes(aligned, sft)
    assert got["win_rate_ci"] == pytest.approx(np.quantile(y[idx].mean(-1), [0.025, 0.975]).tolist())
    assert got["lc_win_rate_ci"][1] < got["win_rate_ci"][1]  # controlling for length lowers the upper end too
    with pytest.raises(ValueError, match="equally long"):
        M.scored_answers([1.0], [1.0], [1], [])
