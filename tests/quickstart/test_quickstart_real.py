"""The real-model quickstart: its shipped data, its held-out split, and (slow) the whole run on SmolLM2."""

from __future__ import annotations

import json

import pytest


def test_shipped_pairs_are_clean_and_topics_are_held_out_whole():
    from qsimpo.config import DataConfig
    from qsimpo.data import read_source
    from qsimpo.quickstart.real import HELDOUT_TOPICS, PAIRS, split_pairs

    source = read_source(DataConfig(path=str(PAIRS), format="explicit"))
    assert source.summary.rows_read == source.summary.rows_read - source.summary.bad_rows >= 200
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    train, held = split_pairs(rows)
    assert len(train) + len(held) == len(rows) and len(held) >= 20
    assert len({r["topic"] for r in held}) == HELDOUT_TOPICS
    assert not {r["topic"] for r in held} & {r["topic"] for r in train}
    for r in rows:  # chosen is the answer's first sentence, rejected the whole answer
        assert r["rejected"].startswith(r["chosen"]) and len(r["rejected"]) > len(r["chosen"])


@pytest.mark.slow
def test_quickstart_aligns_smollm2(tmp_path, smollm2_gguf):
    from qsimpo.quickstart.real import run

    result = run(tmp_path / "quickstart")
    before, after = result["before"], result["after"]
    assert after["reward_accuracy"] >= before["reward_accuracy"] + 0.3
    assert after["one_sentence_rate"] > before["one_sentence_rate"]
    assert after["mean_answer_words"] < before["mean_answer_words"]
