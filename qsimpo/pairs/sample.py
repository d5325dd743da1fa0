"""Sampling n answers per prompt from the policy: a base model (4-bit, loaded as training loads it) or an adapter on it.

Batched with transformers' ``generate`` (left-padded prompts, n rows each). Every answer is drawn from
its own random stream (``qsimpo.eval.generate.SeededSampler``) seeded by (seed, prompt, sample index), so an answer does not
depend on the other prompts of its batch, on the batch size, or on where an interrupted run resumed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qsimpo.errors import InputNotFound, UsageError
from qsimpo.eval.generate import new_tokens_batch, render_prompt


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


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and any end-of-turn ids of the model's generation config."""
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return sorted({*ids, tokenizer.eos_token_id} - {None})


def sample(model, tokenizer, prompts: list[list[dict]], prompt_ids: list[str], n: int, temperature: float, top_p: float,
           max_new_tokens: int, seed: int) -> tuple[list[list[str]], int, int]:
    """(n answers per prompt, tokens generated, answers cut at max_new_tokens), in one ``generate`` call."""
    rows = [ids for ids in (render_prompt(tokenizer, p) for p in prompts) for _ in range(n)]
    seeds = [sample_seed(seed, key, k) for key in prompt_ids for k in range(n)]
    stops = stop_ids(model, tokenizer)
    answers, n_tokens, cut = [], 0, 0
    for new in new_tokens_batch(model, tokenizer, rows, max_new_tokens, temperature, top_p, seeds, stops):
        cut += not new or new[-1] not in stops
        n_tokens += len(new)
        answers.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return [answers[i * n:(i + 1) * n] for i in range(len(prompts))], n_tokens, cut
