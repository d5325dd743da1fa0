"""The numbers ``qsimpo eval`` reports, as pure functions over tensors and lists.

Preference metrics take per-pair *average* response log-probs (what SimPO's reward is made of,
see ``qsimpo.scoring.score_pairs``) and are defined exactly as the trainer logs them
(``qsimpo.train.trainer.pair_metrics``): reward = β·avg_logp, accuracy counts a tie as a miss,
margin = β·(avg_logp(chosen) − avg_logp(rejected)) without γ.

The length diagnostics are the SimPO paper's (§4.4, Fig. 2): a model that exploits length shows
a positive Spearman correlation between response length and average log-likelihood, and wins
mostly the pairs whose chosen answer is the longer one. Generation metrics are word-level
(whitespace tokens), so they compare across tokenizers; the judge's win rate carries a Wilson
interval. No devices, no models: everything here is testable with hand-made numbers.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import torch

from qsimpo.train.loss import simpo_loss


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


def preference_metrics(chosen, rejected, chosen_len, rejected_len, beta: float, gamma: float,
                       label_smoothing: float = 0.0, loss_type: str = "sigmoid", sft_weight: float = 0.0) -> dict:
    """Every per-model number of eval.json's ``models.sft`` / ``models.aligned``, from one model's scores."""
    chosen, rejected = chosen.double(), rejected.double()
    margins = reward_margins(chosen, rejected, beta)
    pure = simpo_loss(chosen, rejected, beta, gamma).losses  # the paper's loss, whatever the run added
    run = simpo_loss(chosen, rejected, beta, gamma, label_smoothing, loss_type, sft_weight).losses
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
        "loss": float(run.mean()),
        "length": {
            "spearman_length_logp": length_logp_spearman(chosen, rejected, chosen_len, rejected_len),
            "accuracy_by_length": accuracy_by_length(chosen, rejected, chosen_len, rejected_len),
            "prefers_longer": prefers_longer(chosen, rejected, chosen_len, rejected_len),
        },
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


# --------------------------------------------------------------------------------------------- judge
def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; ``successes`` may be fractional (ties counted as half)."""
    from scipy.stats import norm

    if n <= 0:
        raise ValueError(f"wilson_interval: n = {n} must be > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes = {successes} must be in [0, n = {n}]")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(a_scores: Sequence[float], b_scores: Sequence[float], confidence: float = 0.95) -> dict:
    """How often A's answer out-scores B's on the same prompt; a tie counts as half a win."""
    if len(a_scores) != len(b_scores) or not len(a_scores):
        raise ValueError(f"win_rate: need two equally long, non-empty score lists, got {len(a_scores)} and {len(b_scores)}")
    outcome = Counter("win" if a > b else "loss" if a < b else "tie" for a, b in zip(a_scores, b_scores))
    n = len(a_scores)
    wins = outcome["win"] + 0.5 * outcome["tie"]
    low, high = wilson_interval(wins, n, confidence)
    return {"n": n, "wins": outcome["win"], "losses": outcome["loss"], "ties": outcome["tie"],
            "win_rate": wins / n, "ci_low": low, "ci_high": high, "confidence": confidence}
