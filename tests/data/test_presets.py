"""Every shipped preset read against its own data set, through the real pipeline, with a tokenizer that has a chat template.

The data sets live under tests/data/fixtures/ as small folders in each Hub repo's exact layout
(made by fixtures/make_fixtures.py); each preset's data section is used as shipped, with data.path
pointed at the folder. Every row must be kept, the prompt must be the conversation before the last
assistant turn rendered once (a user turn repeated in chosen/rejected is not rendered twice), and
each response only the last assistant turn.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from qsimpo.config import load_config, load_yaml
from qsimpo.data import build_dataset
from qsimpo.quickstart.toy import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))

# Every data set a preset or docs/data.md names, by its Hub id: how its rows read as (prompt messages, chosen, rejected).
DATASETS = ("HuggingFaceH4/ultrachat_200k", "princeton-nlp/llama3-ultrafeedback-armorm", "princeton-nlp/gemma2-ultrafeedback-armorm",
            "princeton-nlp/mistral-instruct-ultrafeedback", "HuggingFaceH4/ultrafeedback_binarized",
            "trl-lib/ultrafeedback_binarized", "Anthropic/hh-rlhf", "Intel/orca_dpo_pairs")
# The settings docs/data.md gives for the data sets no preset uses (and the other split of one that is).
DOCUMENTED = [("Intel/orca_dpo_pairs", ["--data.columns", "{prompt: question, system: system}"]),
              ("trl-lib/ultrafeedback_binarized", ["--data.split", "train"]),
              ("HuggingFaceH4/ultrafeedback_binarized", ["--data.split", "test_prefs"]),
              ("Anthropic/hh-rlhf", ["--data.data_dir", "helpful-base", "--data.split", "test", "--data.format", "implicit"])]
LOCAL = {"adapters/quickstart/data/train.jsonl": ROOT / "qsimpo" / "quickstart" / "data" / "pairs.jsonl"}


def data_path(preset: Path) -> str:
    return load_yaml(preset.read_text())["data"]["path"]


def raw_rows(folder: Path, split: str, data_dir: str | None) -> list[dict]:
    """The fixture's rows of one split, read without qsimpo, in file order."""
    import pyarrow.parquet as pq

    if folder.is_file():
        return [json.loads(line) for line in folder.read_text().splitlines()]
    if data_dir:
        with gzip.open(folder / data_dir / f"{split}.jsonl.gz", "rt") as f:
            return [json.loads(line) for line in f]
    jsonl = sorted(folder.glob("*.jsonl"))
    if jsonl:  # a repo of one JSON lines file: datasets calls its only split train
        assert split == "train"
        return [json.loads(line) for line in jsonl[0].read_text().splitlines()]
    return [row for f in sorted((folder / "data").glob(f"{split}-*.parquet")) for row in pq.read_table(f).to_pylist()]


def turns(transcript: str) -> list[dict]:
    parts = re.split(r"\n\n(Human|Assistant): ", transcript)
    return [{"role": "user" if who == "Human" else "assistant", "content": text} for who, text in zip(parts[1::2], parts[2::2])]


def expected(row: dict) -> tuple[list[dict], str, str]:
    """(the conversation before the last assistant turn, chosen answer, rejected answer) of a row, by its layout."""
    if "question" in row:  # Intel/orca_dpo_pairs, through data.columns
        system = [{"role": "system", "content": row["system"]}] if row["system"] else []
        return system + [{"role": "user", "content": row["question"]}], row["chosen"], row["rejected"]
    if isinstance(row["chosen"], str) and "prompt" in row:  # explicit rows (the quickstart's pairs)
        return [{"role": "user", "content": row["prompt"]}], row["chosen"], row["rejected"]
    if isinstance(row["chosen"], str):  # HH transcripts
        chosen, rejected = turns(row["chosen"]), turns(row["rejected"])
        assert chosen[:-1] == rejected[:-1]
        return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
    conversation = [{"role": m["role"], "content": m["content"]} for m in row["chosen"][:-1]]
    return conversation, row["chosen"][-1]["content"], row["rejected"][-1]["content"]


@pytest.fixture(scope="module")
def tok():
    texts = [*LOCAL.values()] + [f for d in DATASETS for f in (FIXTURES / d).rglob("*") if f.suffix in (".parquet", ".gz", ".jsonl")]
    texts = [gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_bytes().decode("latin1") for f in texts]
    # byte-level BPE: every text round-trips; a vocabulary of whole words keeps pairs within the presets' lengths
    return build_tokenizer(texts, vocab_size=3000)


def check_reads(tok, cfg, folder: Path) -> int:
    """Read the fixture with the preset's data settings; assert every row is kept and rendered as the layout says."""
    d = cfg.data
    rows = raw_rows(folder, d.split, d.data_dir)
    pairs, summary = build_dataset(d, tok)
    assert summary.rows_read == summary.kept == len(pairs) == len(rows) >= 2, summary.report()
    assert not any(summary.dropped.values()) and not summary.truncated_prompt and not summary.truncated_response
    for pair, row in zip(pairs, rows):
        conversation, chosen, rejected = expected(row)
        prompt = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert tok.decode(pair["prompt_ids"]) == prompt, pair["location"]
        user = next(m["content"] for m in conversation if m["role"] == "user")
        assert prompt.count(user) == 1  # the user turn is rendered once
        for ids, answer in ((pair["chosen_ids"], chosen), (pair["rejected_ids"], rejected)):
            full = tok.apply_chat_template(conversation + [{"role": "assistant", "content": answer}], tokenize=False)
            assert tok.decode(ids) == full[len(prompt):] + tok.eos_token  # only the last assistant turn, then EOS
            assert user not in tok.decode(ids)
    return len(rows)


def check_reads_conversations(tok, cfg, folder: Path) -> int:
    """An SFT preset (`qsimpo sft`) with its own chat template: every row kept whole, every assistant turn trained,
    exactly what the template renders for it, and nothing else."""
    import copy

    from qsimpo.data import read_source
    from qsimpo.data.conversations import tokenize_conversations
    from qsimpo.templates import apply_template

    tok = copy.deepcopy(tok)
    apply_template(tok, cfg.model)
    rows = raw_rows(folder, cfg.data.split, None)
    convs, summary = tokenize_conversations(cfg.data, read_source(cfg.data, conversations=True), tok)
    assert summary.rows_read == summary.kept == len(convs) == len(rows) >= 2, summary.report()
    assert not any(summary.dropped.values()) and not summary.truncated_response
    for conv, row in zip(convs, rows):
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        ids, mask = conv["input_ids"], conv["assistant_mask"]
        spans = [[]]
        for i, m in zip(ids, mask):
            spans[-1].append(i) if m else spans[-1] and spans.append([])
        spans = [tok.decode(s) for s in spans if s]
        want = []
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                prompt = tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
                turn = tok.apply_chat_template(messages[:k + 1], tokenize=False)[len(prompt):]
                want.append(turn.rstrip() if turn.rstrip().endswith(tok.eos_token) else turn + tok.eos_token)
        assert spans == want, conv["location"]
        assert sum(m["role"] == "assistant" for m in messages) >= 2  # several turns, each of them trained
    return len(rows)


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_reads_its_own_data_set(tok, preset):
    path = data_path(preset)
    folder = LOCAL.get(path) or FIXTURES / path
    assert folder.exists(), (f"{preset.name} reads {path}: add a fixture in its layout under {FIXTURES} "
                             "(fixtures/make_fixtures.py) and its settings to docs/data.md")
    # the preset's own split, subset, data_dir, format and lengths; a preset for "your SFT model" gets a name
    model = [] if load_yaml(preset.read_text())["model"].get("name_or_path") else ["--model.name_or_path", "your-sft-model"]
    cfg = load_config(preset, [*model, "--data.path", str(folder)])
    check = check_reads_conversations if preset.read_text().startswith("# qsimpo sft") else check_reads
    assert check(tok, cfg, folder) >= 8


@pytest.mark.parametrize("dataset,settings", DOCUMENTED, ids=[f"{d}-{s[-1]}" for d, s in DOCUMENTED])
def test_documented_data_sets_read_with_the_settings_docs_give(tok, dataset, settings):
    folder = FIXTURES / dataset
    cfg = load_config(None, ["--model.name_or_path", "unused", "--data.path", str(folder), "--data.max_length", "1024", *settings])
    check_reads(tok, cfg, folder)


def test_every_data_set_has_a_fixture_and_a_row_in_the_docs():
    docs = (ROOT / "docs" / "data.md").read_text()
    for dataset in DATASETS:
        assert (FIXTURES / dataset).is_dir(), dataset
        assert f"`{dataset}`" in docs, f"docs/data.md has no row for {dataset}"
    for preset in PRESETS:
        path = data_path(preset)
        assert path in DATASETS or path in LOCAL, f"{preset.name}: {path} is neither a known data set nor a local file"
