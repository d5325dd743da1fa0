"""train.gradient_checkpointing: auto recomputes only the layers the memory budget needs.

Any split computes the same gradients as all layers recomputed and as none (recompute is exact);
the split is the fewest recomputed layers whose estimated peak fits the budget; `qsimpo plan` prints
it; `qsimpo train` applies it to the model's own decoder layers."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from conftest import build_tiny_base, make_config
from qsimpo.config import LoraConfig, ModelConfig, load_config
from qsimpo.errors import UsageError
from qsimpo.response_logps import pair_logps
from qsimpo.train.losses import simpo_loss
from qsimpo.train.model import add_lora, load_base
from qsimpo.train.packing import PackedPairCollator
from qsimpo.train.plan import GiB, activations, checkpointed_layers, estimate, plan, shape_of, worst_batch

LLAMA3_8B = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
                        num_attention_heads=32, num_key_value_heads=8)
PAIRS = [{"prompt_ids": [1, 5, 9, 11, 7], "chosen_ids": [12, 13, 14], "rejected_ids": [15, 16, 17, 18, 19, 20]},
         {"prompt_ids": [1, 30, 31], "chosen_ids": [40, 41, 42, 43, 44, 45, 46], "rejected_ids": [50, 51]}]


def _avg_only(avg):
    """Average log-probs as the SequenceLogps SimPO reads (without its NLL term it reads ``avg`` only)."""
    from qsimpo.train.logprobs import SequenceLogps

    return SequenceLogps(avg, avg, torch.ones_like(avg))


@pytest.fixture(scope="module")
def four_layer_base(tmp_path_factory, pref_rows):
    return build_tiny_base(tmp_path_factory.mktemp("base4") / "tiny4", pref_rows, num_layers=4, max_positions=256)


def _grads(base, checkpointing) -> tuple[list[bool], dict[str, torch.Tensor]]:
    model = load_base(ModelConfig(name_or_path=str(base), quantization="nf4"), "cpu")
    model = add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), quantized=True, gradient_checkpointing=checkpointing,
                     seed=0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # not the identity, so every layer's LoRA gets a gradient worth comparing
            p.data.normal_(0, 0.05)
    model.train()
    flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen, rejected = pair_logps(model, PackedPairCollator(0)(PAIRS), head_chunk_size=8)
    simpo_loss(*map(_avg_only, (chosen, rejected)), beta=2.0, gamma=0.5).loss.backward()
    return flags, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_any_split_gives_the_gradients_of_all_and_of_none(four_layer_base):
    flags_all, all_layers = _grads(four_layer_base, True)
    flags_none, none = _grads(four_layer_base, False)
    assert flags_all == [True] * 4 and flags_none == [False] * 4
    for k in (1, 3):
        flags, split = _grads(four_layer_base, k)
        assert flags == [True] * k + [False] * (4 - k)  # the first k decoder layers are recomputed, the rest keep theirs
        assert split.keys() == all_layers.keys() == none.keys() and len(split) > 0
        for name in all_layers:
            assert all_layers[name].abs().sum() > 0, name
            torch.testing.assert_close(split[name], all_layers[name], rtol=1e-5, atol=1e-7, msg=name)
            torch.testing.assert_close(none[name], all_layers[name], rtol=1e-5, atol=1e-7, msg=name)


def _cfg(*extra):
    return load_config(None, ["--model.name_or_path", "m", "--data.path", "d", "--data.max_length", "2048",
                              "--train.batch_size", "4", *extra])


def test_auto_recomputes_the_fewest_layers_that_fit():
    shape, cfg = shape_of(LLAMA3_8B), _cfg("--train.gradient_checkpointing", "auto")
    batch = worst_batch(cfg)
    everything = sum(estimate(cfg, shape, batch, checkpointed=0).values())
    all_recomputed = sum(estimate(cfg, shape, batch, checkpointed=32).values())
    assert all_recomputed < everything
    assert checkpointed_layers(cfg, shape, batch, int(everything) + 1) == 0  # all fits: nothing recomputed
    assert checkpointed_layers(cfg, shape, batch, int(all_recomputed) - 1) == 32  # nothing fits: recompute all
    budget = int((everything + all_recomputed) / 2)
    k = checkpointed_layers(cfg, shape, batch, budget)
    rest = everything - activations(cfg, shape, batch, 0)
    assert 0 < k < 32 and rest + activations(cfg, shape, batch, k) <= budget < rest + activations(cfg, shape, batch, k - 1)
    # true and false are what they say, whatever the budget
    assert checkpointed_layers(_cfg(), shape, batch, 1) == 32
    assert checkpointed_layers(_cfg("--train.gradient_checkpointing", "false"), shape, batch, 1) == 0
    with pytest.raises(UsageError, match="train.memory_budget"):
        checkpointed_layers(cfg, shape, batch, None)


def test_plan_prints_the_split():
    text, fits = plan(_cfg("--train.gradient_checkpointing", "auto"), 141 * GiB, LLAMA3_8B)
    assert fits and "activation checkpointing: 0 of 32 decoder layers recomputed" in text and "141.0 GiB, the GPU's memory" in text
    text, fits = plan(_cfg("--train.gradient_checkpointing", "auto", "--train.memory_budget", "20GiB"), 80 * GiB, LLAMA3_8B)
    line = next(x for x in text.splitlines() if "activation checkpointing" in x)
    assert "20.0 GiB, train.memory_budget" in line and not line.split(":")[1].strip().startswith(("0 of", "32 of"))
    assert "32 of 32" in plan(_cfg(), 80 * GiB, LLAMA3_8B)[0]


def test_train_applies_the_split_on_the_cpu(tiny_base, pref_jsonl, tmp_path, capsys):
    from qsimpo.train.recipe import train

    cfg = make_config(tiny_base, pref_jsonl, tmp_path / "run", "--train.max_steps", "1",
                      "--train.gradient_checkpointing", "auto", "--train.memory_budget", "64GiB")
    run = train(cfg)
    assert "activation checkpointing: 0 of 2 decoder layers recomputed in the backward pass (auto: the fewest that fit 64.0 GiB" in capsys.readouterr().out
    assert not any(m.gradient_checkpointing for m in run.trainer.model.modules() if isinstance(m, GradientCheckpointingLayer))
    no_budget = make_config(tiny_base, pref_jsonl, tmp_path / "run2", "--train.max_steps", "1",
                            "--train.gradient_checkpointing", "auto")
    with pytest.raises(UsageError, match="train.memory_budget"):
        train(no_budget)


def test_a_budget_that_is_no_size_is_a_config_error():
    from qsimpo.config import ConfigError

    with pytest.raises(ConfigError, match="train.memory_budget = 'lots': write a size like 24GiB"):
        _cfg("--train.memory_budget", "lots")
