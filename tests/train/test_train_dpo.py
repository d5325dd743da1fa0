"""`qsimpo train` with loss.type dpo end to end on the tiny NF4 model: the one-time reference pass, its cache
beside the tokenized data, reuse on rerun and resume, recomputation when it is missing or the data changed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config
from qsimpo.train.recipe import train


def _ref_file(printed: str) -> Path:
    return Path(re.search(r"dpo reference log-probs: .*; stored in (\S+\.safetensors)", printed).group(1))


def _unpacked_reference(cfg, pairs) -> tuple[list[float], list[float]]:
    """Summed response log-probs under the plain base (no adapter at all), each prompt + response in its own row."""
    from qsimpo.train.model import load_base

    base = load_base(cfg.model, "cpu")
    out = ([], [])
    with torch.no_grad():
        for p in pairs:
            for side, key in enumerate(("chosen_ids", "rejected_ids")):
                ids = torch.tensor([p["prompt_ids"] + p[key]])
                logp = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1)
                t = torch.arange(len(p["prompt_ids"]), ids.shape[1])
                out[side].append(float(logp[t - 1, ids[0, t]].sum()))
    return out


def test_dpo_run_reference_cached_reused_and_recomputed(tiny_base, pref_rows, tmp_path, capsys):
    # rows of this test's own (a word added to each prompt): a reference another test stored for the shared
    # pairs would be read back, rightly, and this test is about the first computation
    pref_jsonl = tmp_path / "pairs.jsonl"
    pref_jsonl.write_text("".join(json.dumps({**r, "prompt": r["prompt"] + " Briefly."}) + "\n" for r in pref_rows))
    out = tmp_path / "run"
    args = ["--loss.type", "dpo", "--train.save_steps", "1", "--train.logging_steps", "1"]
    run = train(make_config(tiny_base, pref_jsonl, out, "--train.max_steps", "2", *args))
    printed = capsys.readouterr().out
    assert "64 train pairs computed once" in printed
    path = _ref_file(printed)
    assert path.is_file() and path.name.startswith("qsimpo-reference-")
    # stored beside the tokenized table, in the datasets cache, not in the run folder
    assert out not in path.parents

    # the policy starts as its reference: the first logged loss is log 2, the margins 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert {"logps/accuracies", "rewards/accuracies"} <= first.keys()
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["loss"] == {"type": "dpo", "beta": 0.1, "label_smoothing": 0.0} and "simpo" not in meta
    assert meta["reference"]["train"]["computed"] is True and meta["reference"]["train"]["pairs"] == 64

    # the stored numbers are a plain forward of the base on unpacked rows
    stored = load_file(path)
    from qsimpo.data import build_dataset
    from qsimpo.train.model import load_tokenizer

    cfg = make_config(tiny_base, pref_jsonl, out)
    pairs, _ = build_dataset(cfg.data, load_tokenizer(cfg.model))
    chosen, rejected = _unpacked_reference(cfg, [pairs[i] for i in range(8)])
    torch.testing.assert_close(stored["chosen"][:8], torch.tensor(chosen), rtol=0, atol=5e-5)
    torch.testing.assert_close(stored["rejected"][:8], torch.tensor(rejected), rtol=0, atol=5e-5)

    # resume: read back, not computed
    train(make_config(tiny_base, pref_jsonl, out, "--train.max_steps", "3", "--train.resume_from", "auto", *args))
    printed = capsys.readouterr().out
    assert "64 train pairs read back" in printed and _ref_file(printed) == path

    # resume with the cache gone: computed again, and said so
    path.unlink()
    train(make_config(tiny_base, pref_jsonl, out, "--train.max_steps", "4", "--train.resume_from", "auto", *args))
    printed = capsys.readouterr().out
    assert "dpo: resuming, but the reference log-probs of the train pairs are not in" in printed
    assert "64 train pairs computed once" in printed and path.is_file()

    # a damaged file under the same name is never trusted
    path.write_bytes(path.read_bytes()[:40])
    train(make_config(tiny_base, pref_jsonl, tmp_path / "other", "--train.max_steps", "1", *args))
    printed = capsys.readouterr().out
    assert "does not hold the reference log-probs" in printed and "64 train pairs computed once" in printed

    # other data (max_length changes the tokenized pairs): another key, computed, the first file left alone
    train(make_config(tiny_base, pref_jsonl, tmp_path / "short", "--train.max_steps", "1", "--data.max_length", "80", *args))
    printed = capsys.readouterr().out
    assert "computed once" in printed and _ref_file(printed) != path
