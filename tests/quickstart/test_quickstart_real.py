"""The real-model quickstart: its shipped data and its held-out split (the whole run: tests/test_journey.py)."""

from __future__ import annotations

import json


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


# The whole real-model quickstart runs in the default suite as the first step of tests/test_journey.py,
# which asserts what it shows (held-out accuracy up by 0.3 or more, shorter one-sentence answers).
