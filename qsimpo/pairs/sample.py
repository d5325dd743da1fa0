"""Sampling n answers per prompt from the policy: a base model (4-bit, loaded as training loads it) or an adapter on it.

Batched with transformers' ``generate`` (left-padded prompts, n rows each). Every answer is drawn from
its own random stream (``SeededSampler``) seeded by (seed, prompt, sample index), so an answer does not
depend on the other prompts of its batch, on the batch size, or on where an interrupted run resumed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from qsimpo.errors import InputNotFound, UsageError
from qsimpo.eval.generate import render_prompt


def is_adapter(model: str) -> bool:
    """Whether ``model`` (a folder or Hub id) is a LoRA adapter rather than a model of its own."""
    from qsimpo.run_dir import ADAPTER_FILES, fetch

    local = Path(model).expanduser()
    if local.exists():
        return local.is_dir() and (local / ADAPTER_FILES[0]).is_file()
    return fetch(model, ADAPTER_FILES[0]) is not None


def check_model(model: str) -> None:
    """Fail before any loading when ``model`` names a local path that is not there."""
    from qsimpo.data import looks_local

    if looks_local(model) and not Path(model).expanduser().exists():
        raise InputNotFound(f"--model {model}: no such file or folder; pass a base model (Hub id, folder or .gguf file) "
                            "or an adapter (a `qsimpo train` output folder or Hub id)")


def load_policy(model: str, base: str | None = None, device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, what was loaded): an adapter on its recorded base (or ``base``), or a base model, in 4 bits."""
    from qsimpo.config import ModelConfig
    from qsimpo.train.model import load_base, load_tokenizer, load_trained

    check_model(model)
    if is_adapter(model):
        try:
            policy, tok = load_trained(model, base=base, device=device, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if isinstance(e, UsageError):
                raise
            raise InputNotFound(f"could not load the adapter {model}: {e}; pass its base with --base PATH_OR_HUB_ID") from None
        return policy, tok, f"{model} (adapter)"
    if base is not None:
        raise UsageError(f"--base {base} goes with an adapter, but --model {model} is a model of its own (no adapter_config.json)")
    cfg = ModelConfig(name_or_path=model, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(cfg)
    policy = load_base(cfg, device)
    policy.eval()
    return policy, tok, model


def sample_seed(seed: int, prompt_id: str, k: int) -> int:
    """The seed of answer ``k`` to a prompt: a function of --seed, the prompt and k only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{k}".encode()).digest()[:8], "little") >> 1


class SeededSampler(LogitsProcessor):
    """Temperature and nucleus (top-p) sampling with one torch.Generator per row of the batch.

    It returns scores that are -inf except at the drawn token, so ``generate`` run greedily emits exactly
    that token. Drawing per row is what makes an answer independent of the rest of its batch.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the mass before the token already reaches top_p
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        probs = logits.softmax(-1)
        picks = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(-1, picks, 0.0)


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and any end-of-turn ids of the model's generation config."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({*ids, tokenizer.eos_token_id} - {None})


@torch.no_grad()
def sample(model, tokenizer, prompts: list[list[dict]], prompt_ids: list[str], n: int, temperature: float, top_p: float,
           max_new_tokens: int, seed: int) -> tuple[list[list[str]], int, int]:
    """(n answers per prompt, tokens generated, answers cut at max_new_tokens), in one ``generate`` call."""
    device = next(model.parameters()).device
    rows = [ids for ids in (render_prompt(tokenizer, p) for p in prompts) for _ in range(n)]
    width, pad = max(map(len, rows)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    generators = [torch.Generator(device=device).manual_seed(sample_seed(seed, key, k)) for key in prompt_ids for k in range(n)]
    stops = stop_ids(model, tokenizer)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         temperature=None, top_p=None, top_k=None, use_cache=True, pad_token_id=pad, eos_token_id=stops,
                         logits_processor=LogitsProcessorList([SeededSampler(generators, temperature, top_p)]))
    answers, n_tokens, cut = [], 0, 0
    for new in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(new) if t in stops), None)
        cut += end is None
        new = new[:end]
        n_tokens += len(new)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))], n_tokens, cut
