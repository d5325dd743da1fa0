"""Does a merged model behave like the adapter it came from? Next-token distributions, compared.

A merge is checked on probe sequences (the first rows of the adapter's training data, or built-in
prompts followed by the adapter's own greedy answer). At every position of every probe we take the
next-token distribution of a reference and of the merged model, and report

    mean KL(reference || merged)   in nats per token: 0 means identical distributions
    top-1 agreement                the fraction of positions where both pick the same next token

against two references: the adapter on its 4-bit base (what was trained, and what `qsimpo merge`
gates on) and the adapter, unmerged, on the dequantized base (the merge arithmetic alone).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BUILTIN_PROMPTS = [
    "Tell me about yourself.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "Give me three tips for a job interview.",
    "What should I cook for dinner tonight?",
    "Summarize the plot of a fairy tale you know.",
    "How do plants make their food?",
]


@dataclass
class Agreement:
    kl: float  # mean KL(reference || merged), nats per token
    top1: float  # fraction of positions whose most likely next token is the same
    positions: int

    def line(self, what: str) -> str:
        return f"{what}: mean KL {self.kl:.2e} nats/token, top-1 agreement {self.top1:.1%} ({self.positions} positions)"


@dataclass
class VerifyReport:
    four_bit: Agreement  # merged vs the adapter on its 4-bit base: the gate
    dequantized: Agreement  # merged vs the adapter on the dequantized base, unmerged
    adapter_effect: Agreement  # the 4-bit adapter vs its 4-bit base alone: the size of what is merged
    max_kl: float
    probes: str  # where the probe sequences came from

    @property
    def passed(self) -> bool:
        return math.isfinite(self.four_bit.kl) and self.four_bit.kl <= self.max_kl  # NaN never passes

    def lines(self) -> list[str]:
        verdict = "ok" if self.passed else "FAILED"
        lines = [f"verify on {self.probes}:",
                 "  " + self.four_bit.line("merged vs adapter on its 4-bit base"),
                 "  " + self.dequantized.line("merged vs adapter on the dequantized base"),
                 "  " + self.adapter_effect.line("for scale, adapter on vs off (4-bit)"),
                 f"  {verdict}: threshold mean KL <= {self.max_kl:g} against the 4-bit adapter"]
        if self.adapter_effect.kl <= self.max_kl:
            lines.append("  warning: the adapter moves its base by less than the threshold, so this check cannot tell a "
                         "correct merge from a lost adapter; compare the KLs above, or lower --max-kl")
        return lines

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> Agreement:
    """Compare two lists of [positions, vocab] log-prob tensors, position by position."""
    p, q = torch.cat(reference), torch.cat(other)
    if p.shape != q.shape:
        raise ValueError(f"log-prob shapes differ: reference {tuple(p.shape)} vs merged {tuple(q.shape)} (vocabularies differ?)")
    # log_softmax of finite logits is finite, so no 0·inf terms; clamp: KL >= 0, up to float rounding
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
    top1 = (p.argmax(-1) == q.argmax(-1)).float()
    return Agreement(kl=float(kl.mean()), top1=float(top1.mean()), positions=int(p.shape[0]))


@torch.no_grad()
def next_token_logprobs(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """log p(next token | prefix) at every position of each sequence, fp32 on the CPU.

    One sequence at a time: no padding, so nothing depends on how a model handles it.
    """
    device = next(model.parameters()).device
    return [torch.log_softmax(model(input_ids=torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()
            for ids in sequences]


def _training_probes(adapter: str, tokenizer, n: int, max_tokens: int) -> list[list[int]] | None:
    """Prompt + chosen response of the first ``n`` training pairs, when the adapter folder says where they are."""
    config = Path(adapter) / "config.yaml"
    if not config.is_file():
        return None
    from qsimpo.config import load_config
    from qsimpo.data import build_dataset

    try:
        data = load_config(config).data
        data.max_rows, data.on_bad_row = n, "skip"
        pairs, _ = build_dataset(data, tokenizer)
    except Exception:  # moved or unreadable data: the built-in prompts still make a valid check
        return None
    return [(p["prompt_ids"] + p["chosen_ids"])[:max_tokens] for p in pairs]


def _builtin_probes(model, tokenizer, n: int, max_new_tokens: int) -> list[list[int]]:
    """Built-in prompts, each followed by the adapter's own greedy answer (the positions it shaped)."""
    from qsimpo.eval.generate import new_tokens, render_prompt

    probes = []
    for prompt in BUILTIN_PROMPTS[:n]:
        ids = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
        probes.append(ids + new_tokens(model, tokenizer, ids, max_new_tokens, seed=None))
    return probes


def probe_sequences(adapter: str, tokenizer, model, n: int = 8, max_tokens: int = 128) -> tuple[list[list[int]], str]:
    """Token sequences to compare on, and a phrase saying where they came from."""
    probes = _training_probes(adapter, tokenizer, n, max_tokens)
    if probes:
        return probes, f"{len(probes)} probes from the training data"
    probes = _builtin_probes(model, tokenizer, n, max_new_tokens=32)
    return probes, f"{len(probes)} built-in prompts with the adapter's greedy answers"
