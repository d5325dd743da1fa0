"""eval's answers come from one left-padded ``generate`` call per batch; they must be the plain path's answers.

Greedy: each batched answer equals the answer to its prompt alone (transformers' ``generate`` on one unpadded prompt),
with the adapter on and off, for prompts of different lengths and any batch size. Sampled: an answer
depends on its seed only, not on the batch it was drawn in.
"""

from __future__ import annotations

import pytest
import torch

from qsimpo.generate import generate, model_stop_ids, prompt_ids

QUESTIONS = ["Tell me about owls.", "What is rain? Answer in one long sentence please, with as much detail as you can.",
             "Hi", "How do plants drink water from the soil, and why do they need it?", "Name a colour.",
             "Why is the sky blue on a clear day but grey when it rains?", "Count to three."]


@pytest.fixture(scope="module")
def model(tiny_adapters):
    from qsimpo.load import load_adapter

    model, tokenizer, _, _ = load_adapter(str(tiny_adapters[0]))
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 3  # lengths differ, so the batch is really padded
    return model, tokenizer, prompts


@torch.no_grad()
def alone(model, tokenizer, prompt, max_new_tokens):
    """The answer's ids the plain way: transformers' greedy generate on the one prompt, cut before the first stop."""
    stops = model_stop_ids(model, tokenizer)
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stops), out)


def ids_of(answers):
    return [a.ids for a in answers]


@pytest.mark.parametrize("adapter", ["on", "off"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_batched_answers_equal_one_prompt_at_a_time(model, adapter, batch_size):
    m, tok, prompts = model
    with m.disable_adapter() if adapter == "off" else torch.no_grad():
        plain = [alone(m, tok, p, 24) for p in prompts]
        batched = [row for i in range(0, len(prompts), batch_size)
                   for row in ids_of(generate(m, tok, prompts[i:i + batch_size], 24))]
    assert batched == plain
    assert len({tuple(a) for a in plain}) > 1  # the answers differ between prompts: a real comparison


def test_sampled_answers_depend_on_their_seed_not_their_batch(model):
    m, tok, prompts = model
    together = ids_of(generate(m, tok, prompts, 16, temperature=1.0, top_p=0.95, seeds=list(range(len(prompts)))))
    alone_ = [ids_of(generate(m, tok, [p], 16, temperature=1.0, top_p=0.95, seeds=[i]))[0] for i, p in enumerate(prompts)]
    assert together == alone_
    other = ids_of(generate(m, tok, prompts[:1], 16, temperature=1.0, top_p=0.95, seeds=[99]))
    assert other[0] != together[0]


def test_eval_answers_each_prompt_as_alone(model, pref_rows):
    """evaluate.generations (batched) gives, for each prompt, the text of the plain path."""
    from qsimpo.eval.evaluate import generations

    m, tok, prompts = model
    pairs = [{"prompt_ids": p, "location": f"q{i}", "text": {"prompt": q, "format": "explicit"}}
             for i, (p, q) in enumerate(zip(prompts, QUESTIONS))]
    gen = generations(m, tok, pairs, None, 24, 0.0, 1.0, seed=0, batch_size=4)
    for sample, p in zip(gen["samples"], prompts):
        assert sample["aligned"] == tok.decode(alone(m, tok, p, 24), skip_special_tokens=True).strip()
