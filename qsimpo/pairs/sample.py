"""Sampling n answers per prompt from the policy: a base model (4-bit, loaded as training loads it) or an adapter on it.

Batched with qsimpo.generate (left-padded prompts, n rows each). Every answer is drawn from its own random
stream (``qsimpo.generate.RowSampler``) seeded by (seed, prompt, sample index), so an answer does not depend on
the other prompts of its batch, on the batch size, or on where an interrupted run resumed. A prompt is rendered
as training renders the row `qsimpo pairs` writes for it (its messages, after the adapter's recorded system
prompt), and an answer ends at the first of ``qsimpo.generate.stop_ids``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from qsimpo.errors import InputNotFound, UsageError


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
