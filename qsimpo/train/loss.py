"""The SimPO loss (Meng, Xia & Chen, NeurIPS 2024), as a pure function.

    L = -log σ( β·avg_logp(y_w|x) − β·avg_logp(y_l|x) − γ )

where avg_logp is the log-likelihood of the response divided by its token count (prompt
tokens excluded) — the length normalisation is part of SimPO's definition, so this function
takes *average* log-probs. γ is the target reward margin in absolute units; the paper's
configs give it as γ/β (``gamma_beta_ratio``), and TRL calls it ``simpo_gamma``.

Options, all off by default so the default is the paper's loss:
- ``label_smoothing`` ε: (1-ε)·L(Δ) + ε·L(-Δ) (the paper's code calls it label_smoothing);
- ``loss_type="hinge"``: max(0, 1 − (βΔ − γ)), as in the paper's code;
- ``sft_weight`` λ: adds λ·(−avg_logp(y_w|x)), the CPO-SimPO NLL term on the chosen response.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class SimPOOutput(NamedTuple):
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] β·avg_logp(chosen), detached
    rejected_rewards: torch.Tensor  # [B] β·avg_logp(rejected), detached


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    sft_weight: float = 0.0,
) -> SimPOOutput:
    """Per-pair SimPO losses and rewards from per-sequence *average* response log-probs."""
    if chosen_avg_logps.shape != rejected_avg_logps.shape or chosen_avg_logps.dim() != 1:
        raise ValueError(
            f"chosen and rejected log-probs must be 1-D and the same shape, got "
            f"{tuple(chosen_avg_logps.shape)} and {tuple(rejected_avg_logps.shape)}"
        )
    chosen_rewards = beta * chosen_avg_logps
    rejected_rewards = beta * rejected_avg_logps
    margin = chosen_rewards - rejected_rewards - gamma  # β·Δ − γ
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    elif loss_type == "hinge":
        losses = torch.relu(1 - margin)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: choose 'sigmoid' (SimPO) or 'hinge'")
    if sft_weight:
        losses = losses - sft_weight * chosen_avg_logps
    return SimPOOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())
