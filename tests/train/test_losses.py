"""The loss family against its papers' definitions.

1. Golden values: each loss from its paper's formula, written here with ``math`` on log-probs
   written out, equals ``qsimpo.train.losses``.
2. The training step: on the tiny model, each loss computed by hand from plain unpacked forwards
   (one row per prompt + response, full logits) gives the same loss and LoRA gradients as the
   trainer's ``compute_loss`` on the packed batch and on the plain batch (chunked head).
3. DPO's stored reference log-probs equal a plain adapter-off forward on unpacked rows, and the
   first DPO loss is log 2 per pair (the policy is its reference).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qsimpo.config import build
from qsimpo.train.logprobs import SequenceLogps
from qsimpo.train.losses import arpo_loss, cpo_loss, dpo_loss, make_loss, orpo_loss, simpo_loss

# ------------------------------------------------------------------ 1. golden values on written-out log-probs
# Two pairs. Chosen: sums −2.0 and −8.0 over 2 and 4 tokens (averages −1.0, −2.0); rejected: −4.5 and −2.0 over
# 3 and 2 tokens (averages −1.5, −1.0); the reference (DPO): chosen −3.0, −7.0, rejected −4.0, −3.0.
D = torch.float64
CW, NW, CL, NL = [-2.0, -8.0], [2, 4], [-4.5, -2.0], [3, 2]
REF_W, REF_L = [-3.0, -7.0], [-4.0, -3.0]
C = SequenceLogps(torch.tensor([s / n for s, n in zip(CW, NW)], dtype=D), torch.tensor(CW, dtype=D), torch.tensor(NW, dtype=D))
R = SequenceLogps(torch.tensor([s / n for s, n in zip(CL, NL)], dtype=D), torch.tensor(CL, dtype=D), torch.tensor(NL, dtype=D))


def nls(z):  # −log σ(z)
    return math.log1p(math.exp(-z))


NLL = -sum(CW) / sum(NW)  # 10/6: the mean over all 6 chosen tokens


def test_dpo_golden():
    # β = 0.1: pair 0: 0.1·((−2 − −3) − (−4.5 − −4)) = 0.1·(1 + 0.5) = 0.15; pair 1: 0.1·((−8 − −7) − (−2 − −3)) = −0.2
    out = dpo_loss(C, R, torch.tensor(REF_W, dtype=D), torch.tensor(REF_L, dtype=D), beta=0.1)
    assert out.losses.tolist() == pytest.approx([nls(0.15), nls(-0.2)])
    assert out.loss.item() == pytest.approx((nls(0.15) + nls(-0.2)) / 2)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1]) and out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.1])
    smoothed = dpo_loss(C, R, torch.tensor(REF_W, dtype=D), torch.tensor(REF_L, dtype=D), beta=0.1, label_smoothing=0.2)
    assert smoothed.losses[0].item() == pytest.approx(0.8 * nls(0.15) + 0.2 * nls(-0.15))


def test_orpo_golden():
    # odds(p) = p / (1 − p) with p = exp(average log-prob); L = NLL + λ·mean(−log σ(log odds_w − log odds_l))
    def log_odds(a):
        p = math.exp(a)
        return math.log(p / (1 - p))

    lam = 0.1
    ratios = [nls(log_odds(w / nw) - log_odds(l / nl)) for w, nw, l, nl in zip(CW, NW, CL, NL)]
    out = orpo_loss(C, R, lam)
    assert out.losses.tolist() == pytest.approx([lam * r for r in ratios])
    assert out.loss.item() == pytest.approx(NLL + lam * sum(ratios) / 2)
    assert out.nll.item() == pytest.approx(NLL)
    assert out.chosen_rewards.tolist() == pytest.approx([lam * -1.0, lam * -2.0])  # λ·average, as TRL logs


def test_cpo_golden():
    # L = mean(−log σ(β·sum_w − β·sum_l)) + α·NLL, β = 0.1, α = 1: margins 0.1·(−2 + 4.5) = 0.25, 0.1·(−8 + 2) = −0.6
    out = cpo_loss(C, R, beta=0.1, alpha=1.0)
    assert out.losses.tolist() == pytest.approx([nls(0.25), nls(-0.6)])
    assert out.loss.item() == pytest.approx((nls(0.25) + nls(-0.6)) / 2 + NLL)
    assert cpo_loss(C, R, beta=0.1, alpha=0.0).loss.item() == pytest.approx((nls(0.25) + nls(-0.6)) / 2)


def test_arpo_golden():
    # w = min(0.9·exp(0.4·|avg_w − avg_l|) − 1, 1): pair 0 |−1 + 1.5| = 0.5 → 0.9·e^0.2 − 1 = 0.0992625;
    # pair 1 |−2 + 1| = 1 → 0.9·e^0.4 − 1 = 0.3426422. L = mean(−log σ(β·(sum_w − w·sum_l))) + α·NLL
    w = [min(0.9 * math.exp(0.4 * abs(a - b)) - 1, 1.0) for a, b in ((-1.0, -1.5), (-2.0, -1.0))]
    assert w == pytest.approx([0.0992625, 0.3426422], abs=1e-7)
    margins = [0.1 * (CW[i] - w[i] * CL[i]) for i in range(2)]
    out = arpo_loss(C, R, beta=0.1, alpha=1.0, relax_coefficient_1=0.9, relax_coefficient_2=0.4)
    assert out.losses.tolist() == pytest.approx([nls(m) for m in margins])
    assert out.loss.item() == pytest.approx(sum(nls(m) for m in margins) / 2 + NLL)
    # equal averages: w = 0.9 − 1 = −0.1 (X-ALMA's code clamps only from above); far apart: w = 1, CPO itself
    same = SequenceLogps(*(torch.tensor([-1.0], dtype=D) for _ in range(2)), torch.tensor([1.0], dtype=D))
    far = SequenceLogps(torch.tensor([-9.0], dtype=D), torch.tensor([-9.0], dtype=D), torch.tensor([1.0], dtype=D))
    assert arpo_loss(same, same, 0.1, 0.0, 0.9, 0.4).losses.item() == pytest.approx(nls(0.1 * (-1.0 - 0.1)))
    assert arpo_loss(same, far, 0.1, 0.0, 0.9, 0.4).losses.item() == pytest.approx(cpo_loss(same, far, 0.1, 0.0).losses.item())


def test_simpo_golden_with_nll():
    out = simpo_loss(C, R, beta=2.0, gamma=0.5, sft_weight=0.5)
    assert out.loss.item() == pytest.approx((nls(2 * (-1.0 + 1.5) - 0.5) + nls(2 * (-2.0 + 1.0) - 0.5)) / 2 + 0.5 * NLL)


# ------------------------------------------------------------------ 2. the training step on the tiny model
PAIRS = [{"prompt_ids": [1, 5, 9, 11, 7], "chosen_ids": [12, 13, 14], "rejected_ids": [15, 16, 17, 18, 19, 20]},
         {"prompt_ids": [1, 30, 31], "chosen_ids": [40, 41, 42, 43, 44, 45, 46], "rejected_ids": [50, 51]},
         {"prompt_ids": [1, 60], "chosen_ids": [61], "rejected_ids": [62, 63, 64]}]
PARAMS = {"simpo": {"beta": 2.0, "gamma_beta_ratio": 0.5, "sft_weight": 0.5}, "dpo": {"beta": 0.1}, "orpo": {"lam": 0.1},
          "cpo": {"beta": 0.1, "alpha": 1.0}, "arpo": {"beta": 0.1, "alpha": 1.0}}


@pytest.fixture(scope="module", params=["nf4", "none"])
def model(request, tiny_base, one_thread):
    """The tiny model with a LoRA adapter, on the NF4 base and on the full-precision base."""
    from qsimpo.config import LoraConfig, ModelConfig
    from qsimpo.train.model import add_lora, load_base

    m = load_base(ModelConfig(name_or_path=str(tiny_base), quantization=request.param, compute_dtype="float32"), "cpu")
    m = add_lora(m, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=request.param != "none", gradient_checkpointing=True,
                 seed=0)
    torch.manual_seed(1)
    for n, p in m.named_parameters():
        if "lora_B" in n:  # not the identity: the policy differs from its reference, and errors in the LoRA path show
            p.data.normal_(0, 0.05)
    m.train()
    return m


def unpacked_logps(model, pairs) -> list[list[tuple[float, int]]]:
    """Per pair, [(sum, count) of chosen, of rejected]: each prompt + response in its own row, full logits."""
    out = []
    for p in pairs:
        row = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([p["prompt_ids"] + p[key]])
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            n = len(p["prompt_ids"])
            targets = torch.arange(n, ids.shape[1])
            row.append((logp[targets - 1, ids[0, targets]].sum(), len(p[key])))
        out.append(row)
    return out


def by_hand(kind: str, pol, ref) -> torch.Tensor:
    """The loss of ``kind`` from the paper's formula, on the unpacked log-probs (ref: the adapter-off ones)."""
    b = len(pol)
    sw, nw = [p[0][0] for p in pol], [p[0][1] for p in pol]
    sl, nl = [p[1][0] for p in pol], [p[1][1] for p in pol]
    nll = -sum(sw) / sum(nw)
    terms = []
    for i in range(b):
        aw, al = sw[i] / nw[i], sl[i] / nl[i]
        if kind == "simpo":
            terms.append(-F.logsigmoid(2.0 * aw - 2.0 * al - 1.0))
        elif kind == "dpo":
            terms.append(-F.logsigmoid(0.1 * ((sw[i] - ref[i][0][0]) - (sl[i] - ref[i][1][0]))))
        elif kind == "orpo":
            odds_w, odds_l = torch.exp(aw) / (1 - torch.exp(aw)), torch.exp(al) / (1 - torch.exp(al))
            terms.append(-0.1 * F.logsigmoid(torch.log(odds_w / odds_l)))
        elif kind == "cpo":
            terms.append(-F.logsigmoid(0.1 * sw[i] - 0.1 * sl[i]))
        elif kind == "arpo":
            w = torch.clamp(0.9 * torch.exp(0.4 * (aw - al).abs()) - 1, max=1.0)
            terms.append(-F.logsigmoid(0.1 * sw[i] - w * 0.1 * sl[i]))
    mean = sum(terms) / b
    return mean + {"simpo": 0.5 * nll, "dpo": 0, "orpo": nll, "cpo": nll, "arpo": nll}[kind]


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def make_trainer(model, cfg, tmp_path):
    from transformers import TrainingArguments

    from qsimpo.train.recipe import has_nll
    from qsimpo.train.trainer import PreferenceTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    return PreferenceTrainer(model=model, args=args, loss_fn=make_loss(cfg), logs_nll=has_nll(cfg), head_chunk_size=16,
                             compute_dtype=torch.float32)


@pytest.mark.parametrize("packing", ["shared_prompt", "none"])
@pytest.mark.parametrize("kind", ["simpo", "dpo", "orpo", "cpo", "arpo"])
def test_training_step_equals_the_paper_formula(model, kind, packing, tmp_path):
    from qsimpo.train.packing import make_collator
    from qsimpo.train.recipe import PairDataset
    from qsimpo.train.reference import Reference

    cfg = build({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "loss": {"type": kind}, kind: PARAMS[kind],
                 "train": {"packing": packing}})
    with torch.no_grad(), model.disable_adapter():
        ref = unpacked_logps(model, PAIRS)
    model.zero_grad()
    expected = by_hand(kind, unpacked_logps(model, PAIRS), ref)
    expected.backward()
    expected_grads = lora_grads(model)

    reference = Reference([float(r[0][0]) for r in ref], [float(r[1][0]) for r in ref], tmp_path, True, 0.0)
    dataset = PairDataset(PAIRS, reference if kind == "dpo" else None)
    batch = make_collator(packing, 0)([dataset[i] for i in range(len(PAIRS))])
    trainer = make_trainer(model, cfg, tmp_path)
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    got = lora_grads(model)
    assert got.keys() == expected_grads.keys() and len(got) > 0
    for name, g in expected_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------ 3. DPO's reference
@pytest.mark.parametrize("packing", ["shared_prompt", "none"])
def test_reference_pass_equals_plain_adapter_off_forward(model, packing):
    from qsimpo.train.packing import make_collator
    from qsimpo.train.reference import reference_logps

    chosen, rejected = reference_logps(model, PAIRS, make_collator(packing, 0), batch_size=2, head_chunk_size=16,
                                       compute_dtype=torch.float32)
    assert model.training  # the pass puts the model back as it found it
    with torch.no_grad(), model.disable_adapter():
        plain = unpacked_logps(model, PAIRS)
    torch.testing.assert_close(chosen, torch.tensor([float(p[0][0]) for p in plain]), rtol=0, atol=2e-5)
    torch.testing.assert_close(rejected, torch.tensor([float(p[1][0]) for p in plain]), rtol=0, atol=2e-5)
    with torch.no_grad():  # and the adapter was really off: with it on the numbers differ
        on = unpacked_logps(model, PAIRS)
    assert abs(float(on[0][0][0]) - float(chosen[0])) > 1e-3


def test_dpo_starts_at_log_2_per_pair(tiny_base, one_thread, tmp_path):
    """A fresh adapter (LoRA B = 0) is its own reference: every pair's DPO loss is log 2 before the first update."""
    from qsimpo.config import LoraConfig, ModelConfig
    from qsimpo.response_logps import pair_sequence_logps
    from qsimpo.train.model import add_lora, load_base
    from qsimpo.train.packing import make_collator
    from qsimpo.train.reference import reference_logps

    m = add_lora(load_base(ModelConfig(name_or_path=str(tiny_base), quantization="nf4"), "cpu"),
                 LoraConfig(r=4, alpha=8, dropout=0.0), quantized=True, gradient_checkpointing=True, seed=0)
    m.train()
    ref_c, ref_r = reference_logps(m, PAIRS, make_collator("shared_prompt", 0), 3, 16, torch.float32)
    chosen, rejected = pair_sequence_logps(m, make_collator("shared_prompt", 0)(PAIRS), 16)
    out = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards, torch.zeros(3), rtol=0, atol=1e-6)
