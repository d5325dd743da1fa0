"""The preference losses' golden values, with the arithmetic written out (qsimpo.train.losses).

Two pairs, β = 2, γ = 0.5 (γ/β = 0.25), response token counts chosen (2, 4) and rejected (3, 2):
  pair 0: avg logp chosen −1.0, rejected −1.5 → rewards −2.0, −3.0; β·Δ − γ = 1.0 − 0.5 = 0.5
          loss = −log σ(0.5) = log(1 + e^−0.5) = log 1.6065307 = 0.4740770
  pair 1: avg logp chosen −2.0, rejected −1.0 → rewards −4.0, −2.0; β·Δ − γ = −2.0 − 0.5 = −2.5
          loss = −log σ(−2.5) = log(1 + e^2.5) = log 13.182494 = 2.5788897
Summed log-probs: chosen −1.0·2 = −2.0 and −2.0·4 = −8.0; rejected −1.5·3 = −4.5 and −1.0·2 = −2.0.
"""

import math

import pytest
import torch

from qsimpo.train.logprobs import SequenceLogps
from qsimpo.train.losses import chosen_nll, simpo_loss

D = torch.float64
C = SequenceLogps(torch.tensor([-1.0, -2.0], dtype=D), torch.tensor([-2.0, -8.0], dtype=D), torch.tensor([2.0, 4.0], dtype=D))
R = SequenceLogps(torch.tensor([-1.5, -1.0], dtype=D), torch.tensor([-4.5, -2.0], dtype=D), torch.tensor([3.0, 2.0], dtype=D))


def seqs(avg):
    """SequenceLogps of average log-probs, one token each (SimPO without NLL reads only the average)."""
    return SequenceLogps(avg, avg, torch.ones_like(avg))


def test_golden_values():
    out = simpo_loss(C, R, beta=2.0, gamma=0.5)
    assert out.losses.tolist() == pytest.approx([0.4740770, 2.5788897], abs=1e-6)
    assert out.loss.item() == pytest.approx((0.4740770 + 2.5788897) / 2, abs=1e-6)
    assert out.chosen_rewards.tolist() == [-2.0, -4.0]
    assert out.rejected_rewards.tolist() == [-3.0, -2.0]
    assert out.nll.item() == 0.0


def test_matches_paper_code_formulation():
    # The paper's code: logits = (c − r) − gamma_beta_ratio; loss = −logsigmoid(β·logits).
    beta, ratio = 2.5, 0.55
    c, r = torch.randn(64, dtype=D), torch.randn(64, dtype=D)
    paper = -torch.nn.functional.logsigmoid(beta * ((c - r) - ratio))
    ours = simpo_loss(seqs(c), seqs(r), beta=beta, gamma=ratio * beta).losses
    torch.testing.assert_close(ours, paper)


def test_label_smoothing():
    # ε = 0.1, pair 0: 0.9 · log(1 + e^−0.5) + 0.1 · log(1 + e^0.5) = 0.9·0.4740770 + 0.1·0.9740770 = 0.5240770
    out = simpo_loss(C, R, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert out.losses[0].item() == pytest.approx(0.5240770, abs=1e-6)


def test_hinge():
    # max(0, 1 − 0.5) = 0.5 and max(0, 1 + 2.5) = 3.5
    out = simpo_loss(C, R, beta=2.0, gamma=0.5, loss_type="hinge")
    assert out.losses.tolist() == pytest.approx([0.5, 3.5])


def test_nll_term_over_chosen_tokens_as_the_paper_code_and_trl():
    """The CPO-SimPO term as princeton-nlp/SimPO's simpo_trainer.py and TRL's cpo_alpha compute it: nn.CrossEntropyLoss
    over every chosen token of the batch, each token weighing the same.

    tokens: −(−2.0 − 8.0) / (2 + 4) = 10/6 = 1.6666667
    pairs:  −(−1.0 + −2.0) / 2 = 1.5 (each pair's average, averaged over pairs: the long pair 1 weighs no more)
    """
    assert chosen_nll(C, "tokens").item() == pytest.approx(10 / 6)
    assert chosen_nll(C, "pairs").item() == pytest.approx(1.5)
    # λ = 0.5 (TRL: cpo_alpha = 0.5): loss = mean SimPO + 0.5 · NLL
    simpo_mean = (0.4740770 + 2.5788897) / 2
    tokens = simpo_loss(C, R, beta=2.0, gamma=0.5, sft_weight=0.5)
    pairs = simpo_loss(C, R, beta=2.0, gamma=0.5, sft_weight=0.5, sft_reduction="pairs")
    assert tokens.loss.item() == pytest.approx(simpo_mean + 0.5 * 10 / 6, abs=1e-6)
    assert pairs.loss.item() == pytest.approx(simpo_mean + 0.5 * 1.5, abs=1e-6)
    assert tokens.losses.tolist() == pairs.losses.tolist()  # the preference term is the same; only the NLL differs
    assert tokens.nll.item() == pytest.approx(10 / 6) and pairs.nll.item() == pytest.approx(1.5)


def test_nll_term_equals_cross_entropy_over_chosen_labels():
    """The same number from logits, as the paper's code gets it: labels −100 on prompt and padding."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, dtype=D)
    labels = torch.tensor([[-100, -100, 3, 4, -100, -100, -100], [-100, 5, 6, 7, 8, 1, -100]])
    paper = torch.nn.CrossEntropyLoss()(logits.view(-1, 11), labels.view(-1))  # mean over the 7 labelled tokens
    logp = torch.log_softmax(logits, -1)
    mask = labels != -100
    per_token = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    seq = SequenceLogps(per_token.sum(-1) / mask.sum(-1), per_token.sum(-1), mask.sum(-1).to(D))
    torch.testing.assert_close(chosen_nll(seq, "tokens"), paper)


def test_defaults_are_pure_simpo():
    plain = simpo_loss(C, R, beta=2.0, gamma=0.5)
    assert torch.equal(plain.losses, torch.log1p(torch.exp(-(2.0 * (C.avg - R.avg) - 0.5))))


def test_gradient_pushes_chosen_up_and_rejected_down():
    c, r = C.avg.clone().requires_grad_(), R.avg.clone().requires_grad_()
    simpo_loss(seqs(c), seqs(r), beta=2.0, gamma=0.5).losses.sum().backward()
    assert (c.grad < 0).all() and (r.grad > 0).all()
    # d/dc −log σ(m) = −β σ(−m): pair 0 → −2 σ(−0.5) = −2 · 0.3775407
    assert c.grad[0].item() == pytest.approx(-2 * (1 / (1 + math.exp(0.5))), abs=1e-6)


def test_shape_mismatch_and_unknown_type():
    with pytest.raises(ValueError, match="same shape"):
        simpo_loss(C, seqs(R.avg[:1]), beta=2.0, gamma=0.5)
    with pytest.raises(ValueError, match="unknown loss_type 'ipo'"):
        simpo_loss(C, R, beta=2.0, gamma=0.5, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown NLL reduction"):
        chosen_nll(C, "sequences")
