"""SimPO loss golden values, with the arithmetic written out.

Two pairs, β = 2, γ = 0.5 (γ/β = 0.25):
  pair 0: avg logp chosen −1.0, rejected −1.5 → rewards −2.0, −3.0; β·Δ − γ = 1.0 − 0.5 = 0.5
          loss = −log σ(0.5) = log(1 + e^−0.5) = log 1.6065307 = 0.4740770
  pair 1: avg logp chosen −2.0, rejected −1.0 → rewards −4.0, −2.0; β·Δ − γ = −2.0 − 0.5 = −2.5
          loss = −log σ(−2.5) = log(1 + e^2.5) = log 13.182494 = 2.5788897
"""

import math

import pytest
import torch

from qsimpo.train.loss import simpo_loss

C = torch.tensor([-1.0, -2.0], dtype=torch.float64)
R = torch.tensor([-1.5, -1.0], dtype=torch.float64)


def test_golden_values():
    out = simpo_loss(C, R, beta=2.0, gamma=0.5)
    assert out.losses.tolist() == pytest.approx([0.4740770, 2.5788897], abs=1e-6)
    assert out.chosen_rewards.tolist() == [-2.0, -4.0]
    assert out.rejected_rewards.tolist() == [-3.0, -2.0]


def test_matches_paper_code_formulation():
    # The paper's code: logits = (c − r) − gamma_beta_ratio; loss = −logsigmoid(β·logits).
    beta, ratio = 2.5, 0.55
    c, r = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    paper = -torch.nn.functional.logsigmoid(beta * ((c - r) - ratio))
    ours = simpo_loss(c, r, beta=beta, gamma=ratio * beta).losses
    torch.testing.assert_close(ours, paper)


def test_label_smoothing():
    # ε = 0.1, pair 0: 0.9 · log(1 + e^−0.5) + 0.1 · log(1 + e^0.5) = 0.9·0.4740770 + 0.1·0.9740770 = 0.5240770
    out = simpo_loss(C, R, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(0.5240770, abs=1e-6)


def test_hinge():
    # max(0, 1 − 0.5) = 0.5 and max(0, 1 + 2.5) = 3.5
    out = simpo_loss(C, R, beta=2.0, gamma=0.5, loss_type="hinge")
    assert out.losses.tolist() == pytest.approx([0.5, 3.5])


def test_sft_weight_adds_chosen_nll():
    # λ = 0.5: pair 0 gains 0.5 · −(−1.0) = 0.5 → 0.9740770
    out = simpo_loss(C, R, beta=2.0, gamma=0.5, sft_weight=0.5)
    assert out.losses[0].item() == pytest.approx(0.9740770, abs=1e-6)


def test_defaults_are_pure_simpo():
    plain = simpo_loss(C, R, beta=2.0, gamma=0.5)
    assert torch.equal(plain.losses, torch.log1p(torch.exp(-(2.0 * (C - R) - 0.5))))


def test_gradient_pushes_chosen_up_and_rejected_down():
    c, r = C.clone().requires_grad_(), R.clone().requires_grad_()
    simpo_loss(c, r, beta=2.0, gamma=0.5).losses.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    # d/dc −log σ(m) = −β σ(−m): pair 0 → −2 σ(−0.5) = −2 · 0.3775407
    assert c.grad[0].item() == pytest.approx(-2 * (1 / (1 + math.exp(0.5))), abs=1e-6)


def test_shape_mismatch_and_unknown_type():
    with pytest.raises(ValueError, match="same shape"):
        simpo_loss(C, R[:1], beta=2.0, gamma=0.5)
    with pytest.raises(ValueError, match="unknown loss_type 'ipo'"):
        simpo_loss(C, R, beta=2.0, gamma=0.5, loss_type="ipo")
