"""qsimpo.response_logps: eval, the quickstart and the demo score through the training path, which equals full logits."""

from __future__ import annotations

import pytest
import torch

from conftest import make_config


def _reference(model, pairs):
    """The plain path: full-vocabulary logits of every prompt + response, averaged by qsimpo.train.logprobs."""
    from qsimpo.data import PairCollator
    from qsimpo.train.logprobs import sequence_logps

    batch = PairCollator(0)(pairs)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    b = len(pairs)
    return lp.avg[:b], lp.avg[b:], lp.count[:b], lp.count[b:]


@pytest.mark.parametrize("chunk", [None, 0, 3])
def test_score_pairs_equals_full_logits(tiny_base, pref_jsonl, tmp_path, chunk):
    from qsimpo.data import build_dataset
    from qsimpo.train.model import add_lora, load_base, load_tokenizer
    from qsimpo.response_logps import score_pairs

    cfg = make_config(tiny_base, pref_jsonl, tmp_path / "out", "--data.max_rows", "10")
    tok = load_tokenizer(cfg.model)
    pairs, _ = build_dataset(cfg.data, tok)
    model = add_lora(load_base(cfg.model, "cpu"), cfg.lora, True, False, seed=0)
    for p in model.parameters():  # a LoRA that is not the identity, so the adapter is really in the path
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()
    got = score_pairs(model, pairs, tok.pad_token_id, batch_size=4, head_chunk_size=chunk)
    want = _reference(model, list(pairs))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=2e-5, rtol=1e-4)
    off = score_pairs(model, pairs, tok.pad_token_id, batch_size=4, adapter_names=["__base__"] * len(pairs))
    with model.disable_adapter():
        base = _reference(model, list(pairs))
    torch.testing.assert_close(off.chosen, base[0], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(off.chosen, got.chosen, atol=1e-4)  # the adapter changes the scores


def test_head_chunk_is_sized_by_the_vocabulary():
    from qsimpo.train.logprobs import HEAD_BLOCK_BYTES, head_chunk_rows

    assert head_chunk_rows(0, 32000) == 0 and head_chunk_rows(64, 256000) == 64  # explicit values stay
    for vocab, rows in ((32000, 2096), (128256, 512), (256000, 256), (262144, 256)):
        got = head_chunk_rows(None, vocab)
        assert got * vocab * 4 <= HEAD_BLOCK_BYTES and abs(got - rows) <= 64, (vocab, got)
