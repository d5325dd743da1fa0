"""The numbers ``qsimpo eval`` reports, as pure functions over tensors and lists.

Preference metrics take per-pair *average* response log-probs (what SimPO's reward is made of,
see ``qsimpo.response_logps.score_pairs``) and are defined exactly as the trainer logs them
(``qsimpo.train.trainer.pair_metrics``): reward = β·avg_logp, accuracy counts a tie as a miss,
margin = β·(avg_logp(chosen) − avg_logp(rejected)) without γ.

The length diagnostics are the SimPO paper's (§4.4, Fig. 2): a model that exploits length shows
a positive Spearman correlation between response length and average log-likelihood, and wins
mostly the pairs whose chosen answer is the longer one. Generation metrics are word-level
(whitespace tokens), so they compare across tokenizers. Answers scored by ``--scorer`` get mean
scores, a win rate and a length-controlled win rate, each with a seeded percentile bootstrap
interval (``scored_answers``). No devices, no models: everything here is testable with hand-made numbers.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from qsimpo.train.logprobs import SequenceLogps
from qsimpo.train.losses import simpo_loss


def _check(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must be 1-D and the same shape, got {tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if chosen.numel() == 0:
        raise ValueError("no pairs to score: chosen and rejected are empty")


def reward_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs whose chosen response has the strictly higher length-normalized log-likelihood."""
    _check(chosen, rejected)
    return float((chosen > rejected).double().mean())


def reward_margins(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair reward margin β·(avg_logp(y_w) − avg_logp(y_l)): SimPO trains it towards γ and beyond."""
    _check(chosen, rejected)
    return beta * (chosen.double() - rejected.double())


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> dict:
    """Spearman's rank correlation (ties get average ranks) with its two-sided p-value; None where undefined."""
    from scipy.stats import spearmanr

    x, y = [float(v) for v in x], [float(v) for v in y]
    if len(x) != len(y):
        raise ValueError(f"spearman: x and y differ in length ({len(x)} vs {len(y)})")
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:  # a constant input has no ranks to correlate
        return {"rho": None, "p_value": None, "n": len(x)}
    res = spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    return {"rho": None if math.isnan(rho) else rho, "p_value": None if math.isnan(p) else p, "n": len(x)}


def length_logp_spearman(chosen, rejected, chosen_len, rejected_len) -> dict:
    """Spearman(response length, average log-likelihood) over all 2N responses of the pairs."""
    return spearman(torch.cat([chosen_len, rejected_len]).tolist(), torch.cat([chosen, rejected]).tolist())


def accuracy_by_length(chosen, rejected, chosen_len, rejected_len) -> dict:
    """Reward accuracy over the pairs whose chosen response is longer, shorter, or the same length.

    A model that learned "longer is better" scores high on chosen_longer and low on chosen_shorter.
    """
    _check(chosen, rejected)
    correct = chosen > rejected
    groups = {"chosen_longer": chosen_len > rejected_len, "chosen_shorter": chosen_len < rejected_len,
              "same_length": chosen_len == rejected_len}
    out = {}
    for name, mask in groups.items():
        n = int(mask.sum())
        out[name] = {"n": n, "accuracy": float(correct[mask].double().mean()) if n else None}
    return out


def prefers_longer(chosen, rejected, chosen_len, rejected_len) -> dict:
    """Among pairs of unequal length, the fraction where the model's reward favours the longer response."""
    _check(chosen, rejected)
    unequal = chosen_len != rejected_len
    n = int(unequal.sum())
    if not n:
        return {"n": 0, "rate": None}
    longer_is_chosen = chosen_len > rejected_len
    favours_chosen = chosen > rejected
    # the reward favours the longer one when it prefers chosen and chosen is longer, or vice versa
    favours_longer = torch.where(longer_is_chosen, favours_chosen, rejected > chosen)
    return {"n": n, "rate": float(favours_longer[unequal].double().mean())}


def length_metrics(chosen, rejected, chosen_len, rejected_len) -> dict:
    """The SimPO paper's length diagnostics of one model's scores (no β: the same for every loss)."""
    return {
        "spearman_length_logp": length_logp_spearman(chosen, rejected, chosen_len, rejected_len),
        "accuracy_by_length": accuracy_by_length(chosen, rejected, chosen_len, rejected_len),
        "prefers_longer": prefers_longer(chosen, rejected, chosen_len, rejected_len),
    }


SHARED_DEFINITION = ("a pair counts as right when the chosen response has the higher average log-prob per token "
                     "(SimPO's length-normalised reward without β, so the same for every loss); the margin is "
                     "avg log-prob(chosen) − avg log-prob(rejected)")


def shared_metrics(chosen, rejected, chosen_len, rejected_len) -> dict:
    """The numbers every adapter is compared by, whatever its loss: ``SHARED_DEFINITION``, no β, γ or loss options."""
    chosen, rejected = chosen.double(), rejected.double()
    margins = reward_margins(chosen, rejected, 1.0)
    return {"n": int(chosen.numel()), "reward_accuracy": reward_accuracy(chosen, rejected),
            "margin_mean": float(margins.mean()), "margin_median": float(margins.median()),
            "logp_chosen_mean": float(chosen.mean()), "logp_rejected_mean": float(rejected.mean()),
            "length": length_metrics(chosen, rejected, chosen_len, rejected_len)}


def preference_metrics(chosen, rejected, chosen_len, rejected_len, beta: float, gamma: float,
                       label_smoothing: float = 0.0, loss_type: str = "sigmoid", sft_weight: float = 0.0,
                       sft_reduction: str = "tokens") -> dict:
    """Every per-model number of eval.json's ``models.sft`` / ``models.aligned``, from one model's scores."""
    chosen, rejected = chosen.double(), rejected.double()
    margins = reward_margins(chosen, rejected, beta)
    seqs = [SequenceLogps(avg, avg * n.double(), n.double()) for avg, n in ((chosen, chosen_len), (rejected, rejected_len))]
    pure = simpo_loss(*seqs, beta, gamma).losses  # the paper's loss, whatever the run added
    run = simpo_loss(*seqs, beta, gamma, label_smoothing, loss_type, sft_weight, sft_reduction).loss  # the NLL over all pairs
    return {
        "n": int(chosen.numel()),
        "reward_accuracy": reward_accuracy(chosen, rejected),
        "reward_margin_mean": float(margins.mean()),
        "reward_margin_median": float(margins.median()),
        "reward_chosen_mean": float(beta * chosen.mean()),
        "reward_rejected_mean": float(beta * rejected.mean()),
        "logp_chosen_mean": float(chosen.mean()),
        "logp_rejected_mean": float(rejected.mean()),
        "simpo_loss": float(pure.mean()),
        "loss": float(run),
        "length": length_metrics(chosen, rejected, chosen_len, rejected_len),
    }


# ---------------------------------------------------------------------------------------- generations
def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, over all responses together."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(texts: Sequence[str], n: int = 3) -> float | None:
    """Mean over responses of the share of word n-grams that repeat an earlier n-gram of the same response.

    (seq-rep-n of Welleck et al., 2019.) 0 for a response without loops; "a b c a b c a b c" scores 4/7.
    Responses shorter than n words have no n-grams and are left out; None when none has any.
    """
    rates = []
    for t in texts:
        grams = ngrams(words(t), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else None


def generation_metrics(texts: Sequence[str], token_counts: Sequence[int], stopped: Sequence[bool]) -> dict:
    """Summary of one model's answers: length, diversity across answers, loops within answers."""
    n = len(texts)
    return {
        "n": n,
        "mean_length_tokens": sum(token_counts) / n if n else None,
        "mean_length_words": sum(len(words(t)) for t in texts) / n if n else None,
        "distinct_2": distinct_n(texts, 2),
        "repetition_rate": repetition_rate(texts, 3),
        "unfinished_rate": sum(not s for s in stopped) / n if n else None,  # hit max_new_tokens without EOS
        "empty_rate": sum(not t.strip() for t in texts) / n if n else None,
    }


# ------------------------------------------------------------------------------- scored answers (--scorer)
BOOTSTRAP_RESAMPLES = 2000
LC_SLOPE_L2 = 0.1  # λ of the weak ridge penalty (λ/2)·b² on the length slope of the LC fit (a N(0, 1/λ) prior)


def outcomes(a_scores: Sequence[float], b_scores: Sequence[float]) -> np.ndarray:
    """Per prompt, A's answer against B's: 1.0 where A scores higher, 0.0 where lower, 0.5 on a tie."""
    a, b = np.asarray(a_scores, dtype=float), np.asarray(b_scores, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError(f"need two equally long, non-empty score lists, got {a.size} and {b.size}")
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def win_rate(a_scores: Sequence[float], b_scores: Sequence[float]) -> dict:
    """How often A's answer out-scores B's on the same prompt; a tie counts as half a win."""
    y = outcomes(a_scores, b_scores)
    return {"n": int(y.size), "wins": int((y == 1).sum()), "losses": int((y == 0).sum()), "ties": int((y == 0.5).sum()),
            "win_rate": float(y.mean())}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -500, 500)))


def _lc_fit(y: np.ndarray, d: np.ndarray, l2: float, steps: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(LC win rate, slope, fell back) of each row of ``y`` (outcomes) and ``d`` (length differences), shape (..., n).

    Newton's method on the ridge-penalised soft-label log-likelihood (IRLS), every row at once; the
    2x2 Newton system is solved in closed form. See ``lc_win_rate`` for the model and the fallbacks.
    """
    sd = d.std(axis=-1, keepdims=True)
    constant_y = np.ptp(y, axis=-1) == 0
    fallback = constant_y | (sd[..., 0] == 0)
    z = d / np.where(sd > 0, sd, 1.0)  # scaled, not centred: z = 0 is "same length"
    y_fit = np.where(fallback[..., None], 0.5, y)  # the fallback rows converge at once (and are replaced below)
    a, b = np.zeros(y.shape[:-1]), np.zeros(y.shape[:-1])
    for _ in range(steps):
        p = _sigmoid(a[..., None] + b[..., None] * z)
        r, w = y_fit - p, p * (1 - p)
        ga, gb = r.sum(-1), (r * z).sum(-1) - l2 * b  # gradient of the penalised log-likelihood
        haa, hab, hbb = w.sum(-1) + 1e-12, (w * z).sum(-1), (w * z * z).sum(-1) + l2 + 1e-12  # minus its Hessian
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        big = np.maximum(np.abs(da), np.abs(db))
        scale = np.minimum(1.0, 4.0 / np.maximum(big, 1e-300))  # at most 4 logits a step: no overshoot from far away
        a, b = a + scale * da, b + scale * db
        if big.max(initial=0.0) < 1e-10:
            break
    lc = np.where(fallback, y.mean(-1), _sigmoid(a))
    return lc, np.where(fallback, 0.0, b), fallback


def lc_win_rate(a_scores: Sequence[float], b_scores: Sequence[float], a_lengths: Sequence[float],
                b_lengths: Sequence[float], l2: float = LC_SLOPE_L2) -> dict:
    """Length-controlled win rate of A over B: the win rate the outcomes predict at equal answer lengths.

    AlpacaEval 2's idea in its simplest form. Per prompt i, the outcome y_i is 1 (A's answer scores
    higher), 0 (lower) or 0.5 (a tie, as a soft label), and d_i = len(A_i) − len(B_i) in tokens.
    With z_i = d_i / sd(d) (the population standard deviation; scaled, not centred, so z = 0 means
    equal lengths) a logistic regression P(A wins | z) = σ(a + b·z) is fitted by maximising
    Σ y_i·log σ(a + b·z_i) + (1 − y_i)·log(1 − σ(a + b·z_i)) − (λ/2)·b², with λ = ``l2`` (0.1: a weak
    ridge on the slope alone, so that wins and losses perfectly separated by length still give a
    finite fit), by Newton's method from (0, 0). The LC win rate is σ(a), the fitted win rate at a
    length difference of zero; ``slope`` is b, the change in log-odds of winning per standard
    deviation of length difference (positive: the longer answer tends to win).

    Fallbacks, reported in ``fallback`` (else None): when every outcome is the same (all wins, all
    losses or all ties) there is nothing for length to explain and the MLE does not exist, and when
    the length difference does not vary (sd = 0, e.g. equal lengths everywhere) length's effect
    cannot be told apart from the intercept: either way the LC win rate is the plain win rate and
    the slope 0.
    """
    y = outcomes(a_scores, b_scores)
    d = np.asarray(a_lengths, dtype=float) - np.asarray(b_lengths, dtype=float)
    if d.shape != y.shape:
        raise ValueError(f"lc_win_rate: {y.size} outcomes but {d.size} length differences")
    lc, slope, fell_back = _lc_fit(y, d, l2)
    reason = None
    if fell_back:
        reason = ("every prompt has the same outcome" if np.ptp(y) == 0 else
                  "the answers' length difference is the same on every prompt")
        reason += ": the plain win rate is reported"
    return {"lc_win_rate": float(lc), "slope": float(slope), "fallback": reason}


def percentile_interval(stats: np.ndarray, confidence: float = 0.95) -> list[float]:
    """[low, high]: the (1 − confidence)/2 and (1 + confidence)/2 quantiles of bootstrap statistics."""
    low, high = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return [float(low), float(high)]


def resample_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) prompt indices drawn with replacement from a seeded generator: the same seed, the same draws."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap: need n >= 1 and resamples >= 1, got n = {n}, resamples = {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def scored_answers(sft_scores: Sequence[float], aligned_scores: Sequence[float], sft_lengths: Sequence[float],
                   aligned_lengths: Sequence[float], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> dict:
    """Every number of eval.json's ``scorer`` section from per-prompt scores and answer lengths (tokens).

    Mean score of each model, the aligned model's win rate against SFT (ties count half) and its
    length-controlled win rate (``lc_win_rate``), each with a percentile bootstrap interval: the
    prompts are resampled with replacement ``resamples`` times (seeded), the same draws for every
    statistic (a paired bootstrap), and the interval is the middle ``confidence`` of the statistic
    recomputed on them.
    """
    s, a = np.asarray(sft_scores, dtype=float), np.asarray(aligned_scores, dtype=float)
    ls, la = np.asarray(sft_lengths, dtype=float), np.asarray(aligned_lengths, dtype=float)
    if not (s.shape == a.shape == ls.shape == la.shape) or s.ndim != 1 or not s.size:
        raise ValueError(f"scored_answers: need equally long, non-empty lists, got {s.size}, {a.size}, {ls.size}, {la.size}")
    wins = win_rate(a, s)
    lc = lc_win_rate(a, s, la, ls)
    idx = resample_indices(s.size, resamples, seed)
    y, d = outcomes(a, s), la - ls
    step = max(1, 2_000_000 // s.size)  # resamples per fit: a few (step, n) arrays at a time, whatever n
    lc_boot = np.concatenate([_lc_fit(y[part], d[part], LC_SLOPE_L2)[0] for part in np.split(idx, range(step, resamples, step))])
    return {
        "n": int(s.size), "confidence": confidence, "resamples": resamples, "seed": seed,
        "mean_score": {"sft": float(s.mean()), "aligned": float(a.mean())},
        "mean_score_ci": {"sft": percentile_interval(s[idx].mean(-1), confidence),
                          "aligned": percentile_interval(a[idx].mean(-1), confidence)},
        "wins": wins["wins"], "losses": wins["losses"], "ties": wins["ties"],
        "win_rate": wins["win_rate"], "win_rate_ci": percentile_interval(y[idx].mean(-1), confidence),
        "lc_win_rate": lc["lc_win_rate"], "lc_win_rate_ci": percentile_interval(lc_boot, confidence),
        "lc_slope": lc["slope"], "lc_fallback": lc["fallback"],
        "mean_length_tokens": {"sft": float(ls.mean()), "aligned": float(la.mean())},
    }
