"""Does the SFT model end a turn where the data does? `qsimpo sft`'s end-of-turn check, and its warning.

A base model's chat-template tokens can be ones it never trained (Gemma's ``<end_of_turn>`` in gemma-3-270m, Llama
3's ``<|eot_id|>`` in its base models), and LoRA trains no embedding row: the SFT model then learns the register but
not where to stop, and every answer runs on to the token limit. `qsimpo sft` reads the base before training and
warns at once when the template's end token looks untrained (untrained_turn_end), and reads the SFT model after
training (turn_end_report), on held-out conversations, teacher-forced: no generation. TurnEndCheck runs the two
readings over one run; benchmarks/bench_base_setting.py uses turn_end_check directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from qsimpo.data.tokenize import turn_end_token

TURN_END_CONVERSATIONS = 64  # held-out conversations the end-of-turn check reads


def turn_end_check(model, items, end_id: int, device, stops: Sequence[int] = (),
                   limit: int = TURN_END_CONVERSATIONS, sides: Sequence[str] = ("base", "sft")) -> dict | None:
    """Does the model end a turn where the data does? For each assistant turn of up to ``limit`` held-out conversations
    that ends at the template's end-of-turn token: that token's log-prob and rank (how many tokens score above it)
    right after the answer, teacher-forced, with the adapter off ("base") and on ("sft"); and in how many of those
    places greedy decoding would stop at all: its first choice is ``end_id`` or another of ``stops`` (the EOS, which
    generation stops at too: qsimpo.generate.stop_ids).

    This says before any generation whether the SFT model will stop its answers: a base model's template tokens can
    be ones it never trained (Gemma's ``<end_of_turn>`` in gemma-3-270m), and LoRA trains no embedding row. Logits are
    built at those positions only (transformers' ``logits_to_keep``), never over the whole vocabulary at every
    position. Every process runs the same inputs, so FSDP's gathers line up; None if no held-out turn ends at
    ``end_id`` (all cut by max_length). ``sides`` picks which to read: `qsimpo sft` reads the base before training
    (for untrained_turn_end's warning) and the SFT model after it. ``vocab``: how many tokens the ranks are among."""
    found = {side: [] for side in sides}
    vocab = 0
    stop_set = {end_id, *stops}
    was_training = model.training
    model.eval()
    try:
        for i in range(min(len(items), limit)):  # items: a list, or the table-backed rows of a large data set
            ids, mask = list(items[i]["input_ids"]), list(items[i]["assistant_mask"])
            ends = [t for t in range(1, len(ids)) if ids[t] == end_id and mask[t]]
            if not ends:
                continue
            inputs = torch.tensor([ids], device=device)
            keep = torch.tensor([t - 1 for t in ends], device=device)  # the position that predicts each end token
            for side in found:
                with torch.no_grad(), (model.disable_adapter() if side == "base" else contextlib.nullcontext()):
                    logits = model(input_ids=inputs, logits_to_keep=keep).logits[0].float()
                logp, vocab = torch.log_softmax(logits, dim=-1), logits.shape[-1]
                at_end = logp[:, end_id]
                found[side] += zip(at_end.tolist(), (logp > at_end[:, None]).sum(-1).tolist(),
                                   (int(t) in stop_set for t in logp.argmax(-1).tolist()))
    finally:
        model.train(was_training)
    if not found[sides[0]]:
        return None
    out = {"turns": len(found[sides[0]]), "vocab": vocab}
    for side, got in found.items():
        ranks = sorted(rank for _, rank, _ in got)
        out[side] = {"mean_logprob": sum(lp for lp, _, _ in got) / len(got), "median_rank": ranks[len(ranks) // 2],
                     "first": sum(rank == 0 for rank in ranks), "stops": sum(stop for _, _, stop in got)}
    return out


UNTRAINED_ROW = 0.01  # an output-layer row under 1% of a median row's norm: never trained


def head_row_norm(model, token_id: int) -> float | None:
    """The norm of ``token_id``'s row of the output layer over a median row's: about 0 for a row never trained (as
    the rows of Llama 3's template tokens are reported to be in its base models). None for a model with no output
    layer to read. Read in slices, so no float32 copy of a large head is made."""
    layer = model.get_output_embeddings()
    weight = getattr(layer, "weight", None)
    if weight is None or weight.device.type == "meta":
        return None
    head = weight.detach()
    norms = torch.cat([head[i:i + 8192].float().norm(dim=-1) for i in range(0, head.shape[0], 8192)])
    return float(norms[token_id] / norms.median())


def untrained_turn_end(check: dict | None, row_norm: float | None, token: str, eos: str | None) -> str | None:
    """The warning `qsimpo sft` gives before training when the template ends a turn with a token other than the EOS
    and the base looks as if it never trained that token: its row of the output layer is all but zero (under
    UNTRAINED_ROW of a median row's norm; ``row_norm``, read with or without held-out data), or, with held-out data
    (``check``, the base's side of turn_end_check), the base ranks it in the bottom half of its vocabulary right
    where the held-out turns end. gemma-3-270m has 260,362 of its 262,144 tokens above Gemma's <end_of_turn> there
    (and 27 above its <eos>). LoRA trains no embedding row, so the SFT model learns to end a turn with such a token
    slowly and greedy answers run on; the EOS, learnt at the end of documents, is learnt much faster
    (benchmarks/RESULTS.md: after the same LoRA SFT, 0/32 greedy answers stopped with the gemma template, 32/32 with
    zephyr). None when there is nothing to warn of."""
    empty = row_norm is not None and row_norm < UNTRAINED_ROW
    b = check["base"] if check else None
    low = b is not None and b["median_rank"] * 2 >= check["vocab"]
    if token == eos or not (low or empty):
        return None
    text = f"{token} looks untrained in this base: "
    if empty:
        text += f"its row of the output layer is all but zero ({row_norm:.1e} of a median row's norm)"
    if b is not None:
        text += ("; " if empty else "") + (
            f"right after the {check['turns']} held-out answers {b['median_rank']:,} of its {check['vocab']:,} tokens "
            f"score above it (median; log p {b['mean_logprob']:.1f})")
    text += (". LoRA trains no embedding row, so the SFT model learns to end a turn with it slowly, and its answers "
             "may run on.")
    if eos:
        text += (f" A template that ends each turn with the base's EOS ({eos}), which it learnt at the end of "
                 "documents, avoids this: --model.chat_template zephyr")
    return text + " (docs/sft.md, \"When answers do not stop\")"


def turn_end_report(check: dict, token: str, eos: str | None = None) -> str:
    """The lines `qsimpo sft` prints after training: the end-of-turn check above, and what to do if it falls short."""
    b, s, n = check["base"], check["sft"], check["turns"]
    text = (f"end of turn on {n} held-out assistant turns ({token} right after each answer, teacher-forced): "
            f"log p {s['mean_logprob']:.2f} (base {b['mean_logprob']:.2f}), median rank {s['median_rank']:,} "
            f"(base {b['median_rank']:,}), ranked first in {s['first']}/{n} (base {b['first']}/{n}); "
            f"greedy decoding would stop there in {s['stops']}/{n} (base {b['stops']}/{n})")
    if s["stops"] * 2 < n:
        text += (f"\n  in most of these turns greedy decoding would not stop after the answer ({token} or another stop "
                 "token first): answers will run on. Train longer (train.num_epochs, more conversations)")
        if eos and eos != token:
            text += f", or end each turn with the base's EOS ({eos}) instead of {token}: --model.chat_template zephyr"
        text += "; docs/sft.md, \"When answers do not stop\", says why a base model's template tokens are slow to learn"
    return text


class TurnEndCheck:
    """One `qsimpo sft` run's check: construct it before training (the base's side on ``items``, the held-out
    conversations unpacked, and the output row's norm; ``warning``, the untrained_turn_end text or None), then call
    ``after`` with the trained model. Every process constructs and calls it alike, so FSDP's gathers line up."""

    def __init__(self, model, tokenizer, items, device):
        from qsimpo.generate import model_stop_ids

        self.end_id, self.items, self.device = turn_end_token(tokenizer), items, device
        self.stops = model_stop_ids(model, tokenizer)
        self.check, self.warning = None, None
        if self.end_id is None:
            return
        self.token = tokenizer.convert_ids_to_tokens(self.end_id)
        if items:
            self.check = turn_end_check(model, items, self.end_id, device, self.stops, sides=("base",))
        row_norm = head_row_norm(model, self.end_id)
        self.warning = untrained_turn_end(self.check, row_norm, self.token, tokenizer.eos_token)
        if self.check is not None:
            self.check["head_row_norm"] = row_norm

    def after(self, model) -> dict | None:
        """The whole check, the SFT model's side added: {"token", "turns", "vocab", "base", "head_row_norm", "sft"},
        as qsimpo.json records it; None without held-out turns to read."""
        if self.check is None:
            return None
        self.check.update(turn_end_check(model, self.items, self.end_id, self.device, self.stops, sides=("sft",)))
        return {"token": self.token, **self.check}
