"""Does a written GGUF file answer like the merged model it came from? Read back through transformers, compared.

The file is loaded by transformers' own GGUF loader (``from_pretrained(..., gguf_file=...)``: its
tokenizer rebuilt from the file's vocabulary, merges and chat template, its weights dequantized),
independently of the code that wrote it, and checked four ways:

    next-token distributions   mean KL(merged || GGUF) and top-1 agreement on held-out text (built-in
                               prompts the adapter was not trained on, each followed by the merged
                               model's greedy answer), held to limits per type: F16 is rounding only
    chat template              the template in the file's metadata is the tokenizer's, character for character
    tokens                     each chat prompt, rendered by that template and tokenized by the file's
                               vocabulary, gives the merged tokenizer's ids (BOS/EOS/PAD the same)
    a greedy answer            to a chat prompt, generated end to end from the file, matches the merged
                               model's (required for 8 bits and more; reported for 4-bit files)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# --gguf TYPE -> (max mean KL nats/token, min top-1 agreement, greedy answer must match). Measured on
# SmolLM2-135M-Instruct with a trained adapter (docs/merge-and-share.md): F16 6e-6 / 100%, Q8_0 3.5e-3 / 95.1%,
# Q4_0 1.4 / 45% (a 135M model breaks at 4 bits: refused). The limits leave room for other models without
# letting a wrong tensor layout through (a missing Q/K permutation moves the top-1 choices; the test shows it).
LIMITS = {
    "f16": (1e-3, 0.99, True),
    "bf16": (2e-2, 0.90, True),
    "q8_0": (2e-2, 0.90, True),
    "q4_0": (0.3, 0.75, False),
    "q4_1": (0.3, 0.75, False),
}
GREEDY_PROMPT = "What is the capital of France?"
GREEDY_TOKENS = 24


@dataclass
class GGUFReport:
    gguf_type: str
    kl: float  # mean KL(merged || GGUF), nats per token
    top1: float
    positions: int
    max_kl: float
    min_top1: float
    chat_template_equal: bool
    tokens_equal: bool  # rendered chat prompts tokenize to the same ids, and the special tokens are the same
    greedy_prompt: str
    greedy_merged: str
    greedy_gguf: str
    greedy_must_match: bool
    probes: str
    problems: list[str] = field(default_factory=list)

    @property
    def greedy_match(self) -> bool:
        return self.greedy_merged == self.greedy_gguf

    @property
    def passed(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        verdict = "ok" if self.passed else "FAILED: " + "; ".join(self.problems)
        return [f"GGUF {self.gguf_type.upper()} read back by transformers, on {self.probes}:",
                f"  vs the merged model: mean KL {self.kl:.2e} nats/token (limit {self.max_kl:g}), top-1 agreement "
                f"{self.top1:.1%} (limit {self.min_top1:.0%}) over {self.positions} positions",
                f"  chat template from the file's metadata {'equals' if self.chat_template_equal else 'DIFFERS from'} "
                f"the tokenizer's; rendered prompts tokenize {'the same' if self.tokens_equal else 'DIFFERENTLY'}",
                f"  greedy answer to {self.greedy_prompt!r}: {'the same' if self.greedy_match else 'DIFFERS'}"
                f"{'' if self.greedy_must_match else ' (reported, not required, at 4 bits)'}: {self.greedy_gguf!r}",
                f"  {verdict}"]

    def to_dict(self) -> dict:
        return {**asdict(self), "greedy_match": self.greedy_match, "passed": self.passed}


def _greedy(model, tokenizer, prompt: str) -> str:
    from qsimpo.generate import answer

    return answer(model, tokenizer, prompt, GREEDY_TOKENS)


def held_out_probes(model, tokenizer, n: int = 8) -> tuple[list[list[int]], str]:
    """Built-in chat prompts (not training data), each followed by the merged model's own greedy answer."""
    from qsimpo.export.verify import BUILTIN_PROMPTS, _builtin_probes

    probes = _builtin_probes(model, tokenizer, min(n, len(BUILTIN_PROMPTS)), max_new_tokens=32)
    return probes, f"{len(probes)} built-in chat prompts with the merged model's greedy answers"


def apply_rope_freqs(model, path: Path) -> None:
    """Give a model read back from ``path`` the file's ``rope_freqs.weight`` (Llama 3.1's rope scaling), which
    transformers' GGUF reader does not read: each rotary frequency divided by its factor, as llama.cpp does."""
    import torch
    from gguf import GGUFReader

    factors = next((t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight"), None)
    if factors is None:
        return
    factors = torch.tensor(factors.data.copy(), dtype=torch.float32)
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "original_inv_freq"):
            module.inv_freq = module.inv_freq / factors.to(module.inv_freq.device)
            module.original_inv_freq = module.inv_freq.clone()


def check(path: str | Path, gguf_type: str, merged, tokenizer, probes: list[list[int]], source: str,
          reference: list | None = None) -> GGUFReport:
    """Compare the GGUF file ``path`` with the merged model (``merged``, its ``tokenizer``) on ``probes``.

    ``reference``: the merged model's next-token log-probs on ``probes``, when already computed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsimpo.export.verify import BUILTIN_PROMPTS, agreement, next_token_logprobs
    from qsimpo.generate import prompt_ids

    path = Path(path)
    kwargs = dict(gguf_file=path.name)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs).eval()
    apply_rope_freqs(model, path)
    reference = reference if reference is not None else next_token_logprobs(merged, probes)
    found = agreement(reference, next_token_logprobs(model, probes))

    template_equal = gguf_tokenizer.chat_template == tokenizer.chat_template
    specials = all(getattr(gguf_tokenizer, t) == getattr(tokenizer, t) for t in ("bos_token", "eos_token", "pad_token"))
    rendered = all(prompt_ids(gguf_tokenizer, p) == prompt_ids(tokenizer, p) for p in BUILTIN_PROMPTS)
    tokens_equal = specials and rendered
    max_kl, min_top1, must_match = LIMITS[gguf_type]
    greedy_merged, greedy_gguf = _greedy(merged, tokenizer, GREEDY_PROMPT), _greedy(model, gguf_tokenizer, GREEDY_PROMPT)

    problems = []
    if not found.kl <= max_kl:  # NaN fails too
        problems.append(f"mean KL {found.kl:.3g} above {max_kl:g}")
    if found.top1 < min_top1:
        problems.append(f"top-1 agreement {found.top1:.1%} below {min_top1:.0%}")
    if not template_equal:
        problems.append("the chat template read back differs from the tokenizer's")
    if not tokens_equal:
        problems.append("the file's tokenizer gives other ids or special tokens than the merged model's")
    if must_match and greedy_merged != greedy_gguf:
        problems.append(f"greedy answer {greedy_gguf!r} differs from the merged model's {greedy_merged!r}")
    return GGUFReport(gguf_type, found.kl, found.top1, found.positions, max_kl, min_top1, template_equal, tokens_equal,
                      GREEDY_PROMPT, greedy_merged, greedy_gguf, must_match, source, problems)
