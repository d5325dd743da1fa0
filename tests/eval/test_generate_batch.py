"""eval's answers come from one left-padded ``generate`` call per batch; they must be the plain path's answers.

Greedy: each batched answer equals the answer to its prompt alone (``new_tokens``, one unpadded prompt),
with the adapter on and off, for prompts of different lengths and any batch size. Sampled: an answer
depends on its seed only, not on the batch it was drawn in.
"""

from __future__ import annotations

import pytest
import torch

from qsimpo.eval.generate import new_tokens, new_tokens_batch, render_prompt

QUESTIONS = ["Tell me about owls.", "What is rain? Answer in one long sentence please, with as much detail as you can.",
             "Hi", "How do plants drink water from the soil, and why do they need it?", "Name a colour.",
             "Why is the sky blue on a clear day but grey when it rains?", "Count to three."]


@pytest.fixture(scope="module")
def model(tiny_adapters):
    from qsimpo.eval.evaluate import load

    model, tokenizer = load(str(tiny_adapters[0]), None)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 3  # lengths differ, so the batch is really padded
    return model, tokenizer, prompts


def alone(model, tokenizer, prompt, max_new_tokens):
    new = new_tokens(model, tokenizer, prompt, max_new_tokens, seed=None)
    eos = tokenizer.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


@pytest.mark.parametrize("adapter", ["on", "off"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_batched_answers_equal_one_prompt_at_a_time(model, adapter, batch_size):
    m, tok, prompts = model
    with m.disable_adapter() if adapter == "off" else torch.no_grad():
        plain = [alone(m, tok, p, 24) for p in prompts]
        batched = [row for i in range(0, len(prompts), batch_size)
                   for row in new_tokens_batch(m, tok, prompts[i:i + batch_size], 24)]
    assert batched == plain
    assert len({tuple(a) for a in plain}) > 1  # the answers differ between prompts: a real comparison


def test_sampled_answers_depend_on_their_seed_not_their_batch(model):
    m, tok, prompts = model
    together = new_tokens_batch(m, tok, prompts, 16, temperature=1.0, top_p=0.95, seeds=list(range(len(prompts))))
    alone_ = [new_tokens_batch(m, tok, [p], 16, temperature=1.0, top_p=0.95, seeds=[i])[0] for i, p in enumerate(prompts)]
    assert together == alone_
    other = new_tokens_batch(m, tok, prompts[:1], 16, temperature=1.0, top_p=0.95, seeds=[99])
    assert other[0] != together[0]


def test_eval_answers_each_prompt_as_alone(model, pref_rows):
    """evaluate.generations (batched) gives, for each prompt, the text of the plain path."""
    from qsimpo.eval.evaluate import generations

    m, tok, prompts = model
    pairs = [{"prompt_ids": p, "location": f"q{i}", "text": {"prompt": q, "format": "explicit"}}
             for i, (p, q) in enumerate(zip(prompts, QUESTIONS))]
    gen = generations(m, tok, pairs, None, 24, 0.0, 1.0, seed=0, batch_size=4)
    for sample, p in zip(gen["samples"], prompts):
        new = alone(m, tok, p, 24)
        text = tok.decode(new[:-1] if new and new[-1] == tok.eos_token_id else new, skip_special_tokens=True).strip()
        assert sample["aligned"] == text
