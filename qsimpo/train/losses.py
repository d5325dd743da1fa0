"""The preference losses, as pure functions of per-sequence response log-probs.

Each takes the chosen and the rejected responses' ``SequenceLogps`` (sum, average and token count
of log π(response token | before it), prompt excluded; ``qsimpo.train.logprobs``), DPO also the
reference's summed log-probs, and the loss's hyperparameters; each returns ``LossOutput``: the
scalar to minimise, the per-pair preference losses, the NLL term and the rewards it defines.
No trainer state, devices or loss names here: ``make_loss`` binds a config to one of them.

    SimPO  −log σ(β·avg_w − β·avg_l − γ)                                     (+ λ·NLL, CPO-SimPO, off)
    DPO    −log σ(β·[(sum_w − ref_w) − (sum_l − ref_l)])
    ORPO   NLL + λ·(−log σ(log odds_w − log odds_l)),  odds = p/(1 − p),  p = exp(avg)
    CPO    −log σ(β·sum_w − β·sum_l) + α·NLL
    ARPO   −log σ(β·sum_w − w·β·sum_l) + α·NLL,  w = min(c₁·exp(c₂·|avg_w − avg_l|) − 1, 1)

NLL is the mean negative log-likelihood over every chosen token of the batch (each token weighs the
same: −Σ sum_w / Σ |y_w|), as ``nn.CrossEntropyLoss`` over the chosen labels computes it in the
SimPO paper's code and in TRL's ``cpo_alpha`` / ORPO. SimPO's ``sft_reduction: pairs`` keeps the
per-pair form instead: the mean over pairs of each pair's average (every pair weighs the same).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from qsimpo.train.logprobs import SequenceLogps


class LossOutput(NamedTuple):
    loss: torch.Tensor  # [] what is minimised: losses.mean() + the weighted NLL term
    losses: torch.Tensor  # [B] the preference term of each pair
    nll: torch.Tensor  # [] the unweighted NLL term on the chosen responses (0 when the loss has none), detached
    chosen_rewards: torch.Tensor  # [B] the loss's own reward of each chosen response, detached
    rejected_rewards: torch.Tensor  # [B] and of each rejected one


def _check(chosen: SequenceLogps, rejected: SequenceLogps) -> None:
    if chosen.avg.shape != rejected.avg.shape or chosen.avg.dim() != 1:
        raise ValueError(f"chosen and rejected log-probs must be 1-D and the same shape, got "
                         f"{tuple(chosen.avg.shape)} and {tuple(rejected.avg.shape)}")


def chosen_nll(chosen: SequenceLogps, reduction: str = "tokens") -> torch.Tensor:
    """−log-likelihood of the chosen responses: per token over the batch ("tokens"), or per pair ("pairs").

    tokens: −Σ_i sum_i / Σ_i |y_i| (the paper's code, TRL's cpo_alpha: a long answer weighs more);
    pairs:  −mean_i (sum_i / |y_i|)  (every pair weighs the same).
    """
    if reduction == "tokens":
        return -chosen.sum.sum() / chosen.count.sum()
    if reduction == "pairs":
        return -chosen.avg.mean()
    raise ValueError(f"unknown NLL reduction {reduction!r}: choose 'tokens' or 'pairs'")


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """−log σ(z), or with ε the conservative mix (1−ε)·(−log σ(z)) + ε·(−log σ(−z))."""
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = losses * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses


def _output(losses, nll_weight, nll, chosen_rewards, rejected_rewards) -> LossOutput:
    loss = losses.mean() + nll_weight * nll if nll_weight else losses.mean()
    return LossOutput(loss, losses, nll.detach(), chosen_rewards.detach(), rejected_rewards.detach())


def _no_nll(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def simpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, beta: float, gamma: float, label_smoothing: float = 0.0,
               loss_type: str = "sigmoid", sft_weight: float = 0.0, sft_reduction: str = "tokens") -> LossOutput:
    """SimPO (Meng, Xia & Chen, 2024): rewards β·avg log-prob, target margin γ; λ = ``sft_weight`` adds the NLL term."""
    _check(chosen, rejected)
    chosen_rewards, rejected_rewards = beta * chosen.avg, beta * rejected.avg
    margin = chosen_rewards - rejected_rewards - gamma
    if loss_type == "sigmoid":
        losses = _sigmoid_loss(margin, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose 'sigmoid' (SimPO) or 'hinge'")
    nll = chosen_nll(chosen, sft_reduction) if sft_weight else _no_nll(losses)
    return _output(losses, sft_weight, nll, chosen_rewards, rejected_rewards)


def dpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al., 2023), sigmoid: rewards β·(log π − log π_ref) on summed log-probs."""
    _check(chosen, rejected)
    if ref_chosen.shape != chosen.sum.shape or ref_rejected.shape != rejected.sum.shape:
        raise ValueError(f"reference log-probs {tuple(ref_chosen.shape)}, {tuple(ref_rejected.shape)} do not match the "
                         f"batch's {tuple(chosen.sum.shape)}")
    chosen_rewards = beta * (chosen.sum - ref_chosen.to(chosen.sum.dtype))
    rejected_rewards = beta * (rejected.sum - ref_rejected.to(rejected.sum.dtype))
    losses = _sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing)
    return _output(losses, 0.0, _no_nll(losses), chosen_rewards, rejected_rewards)


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) of p = exp(avg log-prob): log(1 − p) as log(−expm1(avg)), exact near p = 1."""
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, lam: float) -> LossOutput:
    """ORPO (Hong, Lee & Thorne, 2024): NLL on chosen + λ·(−log σ(log odds_w − log odds_l)), on average log-probs.

    Rewards as TRL's ORPOTrainer logs them: λ·avg log-prob.
    """
    _check(chosen, rejected)
    losses = lam * -F.logsigmoid(log_odds(chosen.avg) - log_odds(rejected.avg))
    return _output(losses, 1.0, chosen_nll(chosen), lam * chosen.avg, lam * rejected.avg)


def cpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, beta: float, alpha: float) -> LossOutput:
    """CPO (Xu et al., 2024): −log σ(β·sum_w − β·sum_l) + α·NLL (α is TRL's cpo_alpha); rewards β·sum."""
    _check(chosen, rejected)
    chosen_rewards, rejected_rewards = beta * chosen.sum, beta * rejected.sum
    losses = _sigmoid_loss(chosen_rewards - rejected_rewards)
    nll = chosen_nll(chosen) if alpha else _no_nll(losses)
    return _output(losses, alpha, nll, chosen_rewards, rejected_rewards)


def arpo_weight(chosen: SequenceLogps, rejected: SequenceLogps, c1: float, c2: float) -> torch.Tensor:
    """ARPO's rejection weight w = min(c₁·exp(c₂·|avg_w − avg_l|) − 1, 1): near 0 (−0.1 at the defaults) when the
    two responses are equally likely per token, rising to 1 as they part. Not detached, as in X-ALMA's code."""
    return torch.clamp(c1 * torch.exp(c2 * (chosen.avg - rejected.avg).abs()) - 1, max=1.0)


def arpo_loss(chosen: SequenceLogps, rejected: SequenceLogps, beta: float, alpha: float, relax_coefficient_1: float,
              relax_coefficient_2: float) -> LossOutput:
    """ARPO (X-ALMA, Xu et al., 2024): CPO with the rejected log-prob scaled by ``arpo_weight``; rewards β·sum."""
    _check(chosen, rejected)
    w = arpo_weight(chosen, rejected, relax_coefficient_1, relax_coefficient_2)
    losses = _sigmoid_loss(beta * (chosen.sum - w * rejected.sum))
    nll = chosen_nll(chosen) if alpha else _no_nll(losses)
    return _output(losses, alpha, nll, beta * chosen.sum, beta * rejected.sum)


LossFn = Callable[[SequenceLogps, SequenceLogps, "tuple[torch.Tensor, torch.Tensor] | None"], LossOutput]


def make_loss(cfg) -> LossFn:
    """``loss(chosen, rejected, reference)`` for a ``qsimpo.config.Config``: the loss ``loss.type`` names, with its
    section's parameters (``reference`` is (ref_chosen_sum, ref_rejected_sum), needed by DPO only)."""
    kind = cfg.loss.type
    if kind == "simpo":
        s = cfg.simpo
        return lambda c, r, ref=None: simpo_loss(c, r, s.beta, s.resolved_gamma, s.label_smoothing, s.loss_type,
                                                 s.sft_weight, s.sft_reduction)
    if kind == "dpo":
        d = cfg.dpo

        def dpo(c, r, ref=None):
            if ref is None:
                raise ValueError("the DPO loss needs the reference log-probs of the batch (ref_chosen, ref_rejected)")
            return dpo_loss(c, r, ref[0], ref[1], d.beta, d.label_smoothing)
        return dpo
    if kind == "orpo":
        return lambda c, r, ref=None: orpo_loss(c, r, cfg.orpo.lam)
    if kind == "cpo":
        return lambda c, r, ref=None: cpo_loss(c, r, cfg.cpo.beta, cfg.cpo.alpha)
    if kind == "arpo":
        a = cfg.arpo
        return lambda c, r, ref=None: arpo_loss(c, r, a.beta, a.alpha, a.relax_coefficient_1, a.relax_coefficient_2)
    raise ValueError(f"unknown loss.type {kind!r}")
