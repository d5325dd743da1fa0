"""Does a merged model behave like the adapter it came from? Next-token distributions, compared.

A merge is checked on probe sequences (the first rows of the adapter's training data, or built-in
prompts followed by the adapter's own greedy answer). At every position of every probe we take the
next-token distribution of a reference and of the merged model, and report

    mean KL(reference || merged)   in nats per token: 0 means identical distributions
    top-1 agreement                the fraction of positions where both pick the same next token

against two references: the adapter on its 4-bit base (what was trained, run as bitsandbytes runs
it) and the adapter, unmerged, on the dequantized base in the merge's dtype (the same weights, so
what differs is the merge: W + B·A added and rounded into one matrix, or added to other weights).

A merge's error only means something next to what the adapter does: the same 5e-3 nats/token is
rounding noise beside an adapter that moves its base by 0.5, and more than the whole adapter beside
one that moves it by 4e-3. So the gate is a ratio: the merged model's KL to the unmerged adapter
must be at most ``max_ratio`` (default a tenth) of the adapter's own effect, its KL to the base with
the adapter off. That reference computes in the merged model's precision, so the ratio measures the
merge and not the compute dtype of the 4-bit run (bf16 on a GPU); the 4-bit reference is held to
``max_kl`` in absolute terms, which catches a wrong dequantization. A KL below ``NEGLIGIBLE_KL``
passes whatever the effect: that is float32 summation-order noise, and an adapter that barely moves
its base has little to keep.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


NEGLIGIBLE_KL = 1e-6  # nats/token: float32 merges measure ~1e-8 to 1e-7 (summation order alone)


@dataclass
class VerifyReport:
    four_bit: Agreement  # merged vs the adapter on its 4-bit base: held to max_kl
    dequantized: Agreement  # merged vs the adapter, unmerged, on the dequantized base: held to max_ratio
    adapter_effect: Agreement  # the 4-bit adapter vs its 4-bit base alone: the size of what is merged
    max_ratio: float  # largest allowed dequantized.kl / adapter_effect.kl
    max_kl: float  # largest allowed four_bit.kl, whatever the effect
    probes: str  # where the probe sequences came from

    @property
    def ratio(self) -> float:
        """The merge's KL to the unmerged adapter as a fraction of the adapter's own effect (inf if it has none)."""
        kl, effect = self.dequantized.kl, self.adapter_effect.kl
        return kl / effect if effect > 0 else (0.0 if kl == 0 else math.inf)

    @property
    def keeps_adapter(self) -> bool:
        return self.dequantized.kl <= NEGLIGIBLE_KL or self.ratio <= self.max_ratio

    @property
    def passed(self) -> bool:  # NaN never passes
        return (math.isfinite(self.four_bit.kl) and math.isfinite(self.dequantized.kl)
                and self.four_bit.kl <= self.max_kl and self.keeps_adapter)

    def lines(self) -> list[str]:
        verdict = "ok" if self.passed else "FAILED"
        return [f"verify on {self.probes}:",
                "  " + self.four_bit.line("merged vs adapter on its 4-bit base"),
                "  " + self.dequantized.line("merged vs adapter on the dequantized base"),
                "  " + self.adapter_effect.line("the adapter's effect, on vs off (4-bit)"),
                f"  {verdict}: the merge's KL to the unmerged adapter is {self.ratio:.2%} of the adapter's effect (limit "
                f"{self.max_ratio:.0%}; under {NEGLIGIBLE_KL:g} always passes); to the 4-bit adapter limit {self.max_kl:g}"]

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "passed": self.passed}


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
    from qsimpo.data import build_dataset
    from qsimpo.run_dir import read_config

    try:
        config = read_config(adapter)
        if config is None:
            return None
        data = config.data
        data.max_rows, data.on_bad_row = n, "skip"
        pairs, _ = build_dataset(data, tokenizer)
    except Exception:  # moved or unreadable data: the built-in prompts still make a valid check
        return None
    return [(p["prompt_ids"] + p["chosen_ids"])[:max_tokens] for p in pairs]


def _builtin_probes(model, tokenizer, n: int, max_new_tokens: int) -> list[list[int]]:
    """Built-in prompts, each followed by the adapter's own greedy answer (the positions it shaped)."""
    from qsimpo.generate import generate, prompt_ids

    probes = []
    for prompt in BUILTIN_PROMPTS[:n]:  # one at a time: no padding in a probe
        ids = prompt_ids(tokenizer, prompt)
        (got,) = generate(model, tokenizer, [ids], max_new_tokens)
        probes.append(ids + got.ids + ([got.stop] if got.stopped else []))  # the end of turn is a position it shaped too
    return probes


def probe_sequences(adapter: str, tokenizer, model, n: int = 8, max_tokens: int = 128) -> tuple[list[list[int]], str]:
    """Token sequences to compare on, and a phrase saying where they came from."""
    probes = _training_probes(adapter, tokenizer, n, max_tokens)
    if probes:
        return probes, f"{len(probes)} probes from the training data"
    probes = _builtin_probes(model, tokenizer, n, max_new_tokens=32)
    return probes, f"{len(probes)} built-in prompts with the adapter's greedy answers"
