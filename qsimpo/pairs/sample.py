"""Sampling n answers per prompt from the policy: a base model (4-bit, loaded as training loads it) or an adapter on it.

Batched with qsimpo.generate (left-padded prompts, n rows each). Every answer is drawn from its own random
stream (``qsimpo.generate.RowSampler``) seeded by (seed, prompt, sample index), so an answer does not depend on
the other prompts of its batch, on the batch size, or on where an interrupted run resumed. A prompt is rendered
as training renders the row `qsimpo pairs` writes for it (its messages, after the adapter's recorded system
prompt), and an answer ends at the first of ``qsimpo.generate.stop_ids``.
"""

from __future__ import annotations

import hashlib


def load_policy(model: str, base: str | None = None, device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, what was loaded): an adapter on its recorded base (or ``base``), or a base model, in 4 bits."""
    from qsimpo.load import load_model

    return load_model(model, base, device, trust_remote_code, flag="--model")


def sample_seed(seed: int, prompt_id: str, k: int) -> int:
    """The seed of answer ``k`` to a prompt: a function of --seed, the prompt and k only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{k}".encode()).digest()[:8], "little") >> 1


def sample(model, tokenizer, prompts: list[list[dict]], prompt_ids: list[str], n: int, temperature: float, top_p: float,
           max_new_tokens: int, seed: int, system_prompt: str | None = None) -> tuple[list[list[str]], int, int]:
    """(n answers per prompt, tokens generated, answers cut at max_new_tokens), in one ``generate`` call."""
    from qsimpo.generate import generate, prompt_ids as render

    rows = [ids for ids in (render(tokenizer, p, system_prompt) for p in prompts) for _ in range(n)]
    seeds = [sample_seed(seed, key, k) for key in prompt_ids for k in range(n)]
    answers = generate(model, tokenizer, rows, max_new_tokens, temperature, top_p, seeds)
    texts = [a.text for a in answers]
    return ([texts[i * n:(i + 1) * n] for i in range(len(prompts))], sum(len(a.ids) for a in answers),
            sum(not a.stopped for a in answers))
