"""Response scores the way training computes them: per-response average log-probs of preference pairs.

One home for scoring. ``pair_logps`` scores a batch of packed pairs (either layout of
``qsimpo.train.packing``); the SimPO loss in ``qsimpo.train.trainer`` and in-training evaluation
call it, and ``score_pairs`` runs it over a list of pairs for ``qsimpo eval``, the quickstart and
the demo. It batches them with the training collator (shared-prompt packed rows) and scores only
the response tokens through the chunked head, so every reward accuracy the kit reports is computed
as the training rewards are, and no full-vocabulary logits are ever built: a model that trains can
be evaluated in the same memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from qsimpo.train.logprobs import SequenceLogps, chunked_token_logps, head_chunk_rows, indexed_logps, per_sequence
from qsimpo.train.packing import attention_inputs, make_collator


def unwrap(model):
    """The transformers model inside DDP / accelerate / PEFT wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attn_implementation(model) -> str:
    return unwrap(model).config._attn_implementation


@contextmanager
def scoring_head(model, score_index, score_labels, chunk_size: int):
    """For the forward passes inside: the output head returns the scored tokens' log-probs, not logits.

    The model still calls its head as ``lm_head(hidden_states)``, inside every wrapper (DDP,
    FSDP, PEFT), and only the head's ``forward`` is replaced, so the hooks a sharding wrapper
    puts on the head module run as for any linear layer: FSDP2 (and ZeRO-3) gather the weight
    before this forward and again before its backward, and the chunked head reads whole
    weights. ``.logits`` of the output is then ``[T]``, one log-prob per scored token. Gemma-2's
    soft-cap is applied by the chunked head instead of by the model.
    """
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"train.head_chunk_size needs a plain nn.Linear output head, got {type(head).__name__}: set it to 0")
    softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(hidden):
        return chunked_token_logps(hidden, head.weight, head.bias, score_index, score_labels, chunk_size, softcap)

    head.forward = forward  # an instance attribute: the class's forward and every hook stay as they are
    if softcap is not None:
        lm.config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward
        if softcap is not None:
            lm.config.final_logit_softcapping = softcap


def pair_logps(model, inputs, head_chunk_size: int = 0, compute_dtype=torch.float32, **forward_kwargs):
    """(chosen, rejected) average response log-probs for a batch of either layout (qsimpo.train.packing).

    The one scoring function: the training loss, in-training evaluation, ``qsimpo eval``, the
    quickstart and the demo all score responses through it. ``forward_kwargs`` go to the model
    (the demo passes peft's per-row ``adapter_names``).
    """
    chosen, rejected = pair_sequence_logps(model, inputs, head_chunk_size, compute_dtype, **forward_kwargs)
    return chosen.avg, rejected.avg


def pair_sequence_logps(model, inputs, head_chunk_size: int = 0, compute_dtype=torch.float32, **forward_kwargs):
    """``pair_logps`` with sums and token counts: (chosen, rejected) ``SequenceLogps``, what the losses take."""
    b = int(inputs["num_pairs"])
    kwargs = {"input_ids": inputs["input_ids"], "use_cache": False,
              **attention_inputs(inputs, attn_implementation(model), compute_dtype), **forward_kwargs}
    index, labels, seq = inputs["score_index"], inputs["score_labels"], inputs["score_seq"]
    if head_chunk_size:
        with scoring_head(model, index, labels, head_chunk_size):
            logps = per_sequence(model(**kwargs).logits, seq, 2 * b)
    else:
        logps = indexed_logps(model(**kwargs).logits, index, labels, seq, 2 * b)  # the model applied any soft-cap itself
    return SequenceLogps(*(t[:b] for t in logps)), SequenceLogps(*(t[b:] for t in logps))


class PairScores(NamedTuple):
    chosen: torch.Tensor  # [N] average log-prob of each chosen response
    rejected: torch.Tensor  # [N] average log-prob of each rejected response
    chosen_len: torch.Tensor  # [N] response token counts
    rejected_len: torch.Tensor


@torch.no_grad()
def score_pairs(model, pairs, pad_token_id: int, batch_size: int = 8, progress: bool = False,
                head_chunk_size: int | None = None, adapter_names: list[str] | None = None) -> PairScores:
    """Average response log-probs of every pair under ``model`` (in eval mode, no grad).

    ``head_chunk_size`` as ``train.head_chunk_size`` (None: sized by the vocabulary). ``adapter_names``
    (one per pair) selects a peft adapter per row, "__base__" for none.
    """
    lm = unwrap(model)
    collate = make_collator("shared_prompt", pad_token_id, attn_implementation(model))
    chunk = head_chunk_rows(head_chunk_size, lm.config.vocab_size)
    dtype = lm.get_input_embeddings().weight.dtype
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {k: [] for k in PairScores._fields}
    batches = range(0, len(pairs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    try:
        for i in batches:
            chunk_pairs = pairs[i : i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk_pairs).items()}
            extra = {"adapter_names": adapter_names[i : i + batch_size]} if adapter_names is not None else {}
            chosen, rejected = pair_logps(model, batch, chunk, dtype, **extra)
            out["chosen"].append(chosen.float().cpu())
            out["rejected"].append(rejected.float().cpu())
            out["chosen_len"].append(torch.tensor([len(p["chosen_ids"]) for p in chunk_pairs]))
            out["rejected_len"].append(torch.tensor([len(p["rejected_ids"]) for p in chunk_pairs]))
    finally:
        model.train(was_training)
    return PairScores(*(torch.cat(out[k]) for k in PairScores._fields))


@torch.no_grad()
def response_log_softmax(model, inputs) -> torch.Tensor:
    """[T, V] float32 log-softmax of the next-token distribution at every scored response position of a collated batch.

    The full distributions ``pair_logps`` reduces to the label's log-prob: what a divergence between two models (KL
    from the SFT model in ``qsimpo eval``) needs. Full-vocabulary logits of the batch are built once here.
    """
    kwargs = {"input_ids": inputs["input_ids"], "use_cache": False,
              **attention_inputs(inputs, attn_implementation(model), unwrap(model).get_input_embeddings().weight.dtype)}
    logits = model(**kwargs).logits  # the model applied any soft-cap itself
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1])[inputs["score_index"]].float(), -1)
