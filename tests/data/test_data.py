"""qsimpo.data / qsimpo.formats: sources, row formats, bad rows, token boundaries, truncation, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import HH_SAMPLE
from qsimpo.config import DataConfig
from qsimpo.data import (DataError, DataSummary, PairCollator, build_dataset, format_pair, read_source, render_pair,
                         split_eval, tokenize_pair)
from qsimpo.quickstart.toy import build_tokenizer


EXPLICIT = {"prompt": "What is the capital of France?", "chosen": "Paris is the capital.", "rejected": "I like trains."}
TRL = {"prompt": [{"role": "user", "content": "Name a red fruit."}],
       "chosen": [{"role": "assistant", "content": "A strawberry."}],
       "rejected": [{"role": "assistant", "content": "The sky is blue."}]}
ULTRA = {"prompt": "Name a red fruit.",  # UltraFeedback-binarized style: chosen/rejected hold the whole chat
         "chosen": [{"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "A cherry."}],
         "rejected": [{"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "Blue."}],
         "score_chosen": 8.0}
HH = {"chosen": "\n\nHuman: Is it cold?\n\nAssistant: A bit.\n\nHuman: Should I wear a coat?\n\nAssistant: Yes, take a warm coat.",
      "rejected": "\n\nHuman: Is it cold?\n\nAssistant: A bit.\n\nHuman: Should I wear a coat?\n\nAssistant: Yes, no."}
HH_PROMPT = "\n\nHuman: Is it cold?\n\nAssistant: A bit.\n\nHuman: Should I wear a coat?\n\nAssistant:"


def _corpus() -> list[str]:
    texts = [EXPLICIT["prompt"], EXPLICIT["chosen"], EXPLICIT["rejected"], HH["chosen"], HH["rejected"],
             "user: assistant: system: Name a red fruit. A strawberry. The sky is blue. A cherry. Blue."]
    return texts * 20 + [f"The number {i} is a word among many long words, sentences and stories." for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(_corpus())


@pytest.fixture(scope="module")
def tok_plain():
    return build_tokenizer(_corpus(), chat_template=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def triples(tmp_path: Path, rows, **settings):
    """What `qsimpo train`/`eval`/`inspect-data` read from ``rows`` written as t.jsonl: (kept texts, summary)."""
    source = read_source(DataConfig(path=str(write_jsonl(tmp_path / "t.jsonl", rows)), **settings))
    return source.texts(), source.summary


# ---------------------------------------------------------------------------------------------- formats
def test_explicit_rows_are_detected_and_kept_verbatim(tmp_path):
    (t,), summary = triples(tmp_path, [EXPLICIT])
    assert summary.format == t["format"] == "explicit"
    assert (t["prompt"], t["chosen"], t["rejected"]) == (EXPLICIT["prompt"], EXPLICIT["chosen"], EXPLICIT["rejected"])
    assert t["location"] == f"{tmp_path / 't.jsonl'}:line 1"


def test_conversational_trl_style_prompt_list_and_final_assistant_turns(tmp_path):
    (t,), summary = triples(tmp_path, [TRL])
    assert summary.format == "conversational"
    assert t["prompt"] == TRL["prompt"]
    assert (t["chosen"], t["rejected"]) == ("A strawberry.", "The sky is blue.")


def test_conversational_full_conversations_share_their_prefix_and_ignore_the_string_prompt(tmp_path):
    (t,), _ = triples(tmp_path, [ULTRA])
    assert t["prompt"] == [{"role": "user", "content": "Name a red fruit."}]  # not duplicated by the string prompt
    assert (t["chosen"], t["rejected"]) == ("A cherry.", "Blue.")
    multi = {"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Fruit?"},
                        {"role": "assistant", "content": "Apple", "extra": 1}]}
    multi["rejected"] = multi["chosen"][:-1] + [{"role": "assistant", "content": "No"}]
    (t,), _ = triples(tmp_path, [multi])
    assert [m["content"] for m in t["prompt"]] == ["Be brief.", "Hi", "Hello", "Fruit?"]
    assert (t["chosen"], t["rejected"]) == ("Apple", "No")


def test_implicit_prompt_ends_at_last_shared_assistant_marker(tmp_path):
    (t,), summary = triples(tmp_path, [HH])
    assert summary.format == "implicit"
    assert t["prompt"] == HH_PROMPT  # the shared "Yes," is cut back: it belongs to the responses
    assert (t["chosen"], t["rejected"]) == (" Yes, take a warm coat.", " Yes, no.")
    assert t["prompt"] + t["chosen"] == HH["chosen"] and t["prompt"] + t["rejected"] == HH["rejected"]


def test_forced_format_rejects_the_other_shape(tmp_path):
    with pytest.raises(DataError, match="mixed_types"):
        triples(tmp_path, [EXPLICIT], format="conversational")
    (t,), _ = triples(tmp_path, [{**HH, "prompt": "ignored"}], format="implicit")
    assert t["prompt"] == HH_PROMPT
    with pytest.raises(ValueError, match="on_bad_row"):
        triples(tmp_path, [EXPLICIT], on_bad_row="ignore")


def msg(role, content):
    return {"role": role, "content": content}


# (good row that sets the dataset's format, bad row, reason, words the message must contain)
BAD_ROWS = [
    (EXPLICIT, '{"prompt": "a", "chosen": ', "malformed_json", "invalid JSON"),
    (EXPLICIT, "[1, 2]", "not_an_object", "list"),
    (EXPLICIT, {"prompt": "p", "chosen": "c"}, "missing_key", "'rejected'"),
    (EXPLICIT, {"chosen": "c", "rejected": "r"}, "missing_key", "'prompt'"),
    (EXPLICIT, {"prompt": "p", "chosen": None, "rejected": "r"}, "empty_text", "chosen is null"),
    (EXPLICIT, {"prompt": " \n ", "chosen": "c", "rejected": "r"}, "empty_text", "prompt is empty"),
    (EXPLICIT, {"prompt": "p", "chosen": "same", "rejected": "same"}, "identical_pair", "identical"),
    (EXPLICIT, TRL, "mixed_types", "message lists"),
    (EXPLICIT, {"prompt": "p", "chosen": "c", "rejected": [msg("assistant", "r")]}, "mixed_types", "rejected is messages"),
    (TRL, {**TRL, "chosen": [msg("gpt", "x")]}, "unknown_role", "'gpt'"),
    (TRL, {**TRL, "chosen": [{"role": "assistant"}]}, "missing_key", "chosen[0] has no 'content'"),
    (TRL, {**TRL, "rejected": [msg("assistant", "")]}, "empty_text", "rejected[0].content"),
    (TRL, {**TRL, "chosen": [msg("user", "x")]}, "no_assistant_turn", "chosen"),
    (TRL, {"chosen": [msg("user", "a"), msg("assistant", "b")], "rejected": [msg("user", "X"), msg("assistant", "c")]},
     "no_shared_prompt", "differ before their last message"),
    (TRL, {"chosen": [msg("assistant", "b")], "rejected": [msg("assistant", "c")]}, "empty_text", "no prompt messages"),
    (TRL, EXPLICIT, "mixed_types", "strings"),
    (TRL, {**TRL, "chosen": ["just a string"]}, "mixed_types", "chosen[0] is a string"),
    (HH, {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "no_shared_prompt", "Assistant:"),
    (HH, {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected": "\n\nHuman: a\n\nAssistant: d"}, "empty_text", "chosen has no response"),
]


@pytest.mark.parametrize("good,bad,reason,needle", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, _, r, _) in enumerate(BAD_ROWS)])
def test_bad_row_raises_naming_file_line_reason_and_fix(tmp_path, good, bad, reason, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(path), on_bad_row="error"))
    message = str(err.value)
    assert f"bad.jsonl:line 3: {reason}" in message
    assert needle in message
    assert "data.on_bad_row: skip" in message
    assert err.value.reason == reason


@pytest.mark.parametrize("good,bad,reason,needle", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, _, r, _) in enumerate(BAD_ROWS)])
def test_bad_row_is_counted_when_skipped(tmp_path, good, bad, reason, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, "", good])  # the blank line is not a row
    source = read_source(DataConfig(path=str(path), on_bad_row="skip"))
    out, summary = source.texts(), source.summary
    assert [t["location"] for t in out] == [f"{path}:line {n}" for n in (1, 2, 5)]
    assert summary.rows_read == 4
    assert {r: n for r, n in summary.dropped.items() if n} == {reason: 1}


def test_many_bad_rows_are_each_counted_under_their_reason(tmp_path):
    rows = [EXPLICIT] + [bad for good, bad, _, _ in BAD_ROWS if good is EXPLICIT] + [EXPLICIT]
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    cfg = DataConfig(path=str(path), on_bad_row="skip")
    pairs, summary = build_dataset(cfg, build_tokenizer(_corpus()[:50]))
    expected = {"malformed_json": 1, "not_an_object": 1, "missing_key": 2, "empty_text": 2, "identical_pair": 1, "mixed_types": 2}
    assert {r: n for r, n in summary.dropped.items() if n} == expected
    assert summary.kept == len(pairs) == 2 and summary.rows_read == len(rows)
    assert summary.kept + sum(summary.dropped.values()) == summary.rows_read


# --------------------------------------------------------------------------------------------- sources
def read(path, **settings) -> list[dict]:
    """The kept rows of a source as read_source reads them (train, eval and inspect-data read this way)."""
    return read_source(DataConfig(path=str(path), **settings)).texts()


def test_json_list_json_lines_in_json_and_parquet(tmp_path):
    rows = [EXPLICIT, {**EXPLICIT, "chosen": "Paris."}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(map(json.dumps, rows)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    for name in ("list.json", "lines.json", "rows.parquet"):
        got = read(tmp_path / name)
        assert [{k: t[k] for k in EXPLICIT} for t in got] == rows, name
    assert read(tmp_path / "list.json")[1]["location"] == f"{tmp_path / 'list.json'} row 1"
    assert read(tmp_path / "lines.json")[1]["location"] == f"{tmp_path / 'lines.json'}:line 2"
    assert read(tmp_path / "rows.parquet")[1]["location"] == f"{tmp_path / 'rows.parquet'} row 1"
    assert len(read(tmp_path / "rows.parquet", max_rows=1)) == 1
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError, match=r"obj.json: expected a JSON list .* keys data"):
        read(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text('[\n{"prompt": "a",\n')
    with pytest.raises(DataError, match=r"broken.json:line \d+: invalid JSON"):
        read(tmp_path / "broken.json")


def test_datasets_folders_dataset_and_datasetdict(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list([EXPLICIT] * 3)
    ds.save_to_disk(str(tmp_path / "plain"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    assert [t["location"] for t in read(tmp_path / "plain")] == [f"{tmp_path / 'plain'} row {i}" for i in range(3)]
    test_rows = read(tmp_path / "dict", split="test")
    assert [(t["location"], {k: t[k] for k in EXPLICIT}) for t in test_rows] == [(f"{tmp_path / 'dict'}[test] row 0", EXPLICIT)]
    with pytest.raises(DataError, match="no split 'validation'; available splits: train, test; set data.split"):
        read(tmp_path / "dict", split="validation")
    assert len(read(tmp_path / "dict", max_rows=2)) == 2


def test_missing_files_and_hub_ids(tmp_path, monkeypatch):
    import datasets

    for missing in (str(tmp_path / "nope.jsonl"), "pairs.parquet", "./data", "a/b/c"):
        with pytest.raises(DataError, match="file not found"):
            read(missing)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read(tmp_path / "x.csv")
    calls = []

    def offline(path, name=None, data_dir=None, split=None):
        calls.append((path, split))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load 'someone/pairs' as a local file or a Hub dataset: ConnectionError"):
        read("someone/pairs", split="train_prefs")
    assert calls == [("someone/pairs", "train_prefs")]


def test_hub_style_repo_subfolder_is_read_with_data_dir(tmp_path, monkeypatch):
    """Anthropic/hh-rlhf keeps each subset in a folder (harmless-base/train.jsonl.gz): data.data_dir picks one."""
    import gzip

    import datasets

    datasets.disable_progress_bars()
    repo = tmp_path / "hh-rlhf"
    for folder, text in (("harmless-base", "harmless"), ("helpful-base", "helpful")):
        (repo / folder).mkdir(parents=True)
        for split in ("train", "test"):
            row = {"chosen": HH["chosen"].replace("coat", f"{text} {split}"), "rejected": HH["rejected"]}
            with gzip.open(repo / folder / f"{split}.jsonl.gz", "wt") as f:
                f.write(json.dumps(row) + "\n")
    rows = read(repo, split="test", data_dir="harmless-base")
    assert [(t["location"], "harmless test" in t["prompt"] + t["chosen"]) for t in rows] == [
        (f"{repo}/harmless-base[test] row 0", True)]
    seen = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, data_dir=None, split=None:
                        seen.append((path, name, data_dir, split)) or datasets.Dataset.from_list([HH]))
    assert [t["location"] for t in read("Anthropic/hh-rlhf", split="test", data_dir="harmless-base", on_bad_row="skip")] == [
        "Anthropic/hh-rlhf/harmless-base[test] row 0"]
    assert seen == [("Anthropic/hh-rlhf", None, "harmless-base", "test")]


# ------------------------------------------------------------------------------------- tokenization
def _full_text(tok, triple):
    """What the tokenizer would see for prompt + response as one string, with one BOS and one EOS."""
    prompt_text, chosen_text, _ = render_pair(tok, triple)
    text = prompt_text + chosen_text
    return ("" if text.startswith(tok.bos_token) else tok.bos_token) + text + tok.eos_token


# The normalised texts of EXPLICIT, ULTRA and HH, as the format tests above read them.
CASES = {"explicit": {**EXPLICIT, "format": "explicit"},
         "conversational": {"prompt": [msg("user", "Name a red fruit.")], "chosen": "A cherry.", "rejected": "Blue.",
                            "format": "conversational"},
         "implicit": {"prompt": HH_PROMPT, "chosen": " Yes, take a warm coat.", "rejected": " Yes, no.", "format": "implicit"}}


@pytest.mark.parametrize("templated", [True, False], ids=["template", "no-template"])
@pytest.mark.parametrize("fmt", list(CASES))
def test_boundary_is_exact_with_one_bos_and_one_eos(tok, tok_plain, fmt, templated):
    t = tok if templated else tok_plain
    triple = CASES[fmt]
    bos, eos = t.bos_token_id, t.eos_token_id
    prompt_text = render_pair(t, triple)[0]
    if templated:
        assert prompt_text.startswith("<s>") and t(prompt_text)["input_ids"][:2] == [bos, bos]  # the trap is real
    enc = tokenize_pair(t, triple, max_length=512, max_prompt_length=256)
    p, c = enc["prompt_ids"], enc["chosen_ids"]
    assert p[0] == bos and p.count(bos) == 1
    assert c[-1] == eos and c.count(eos) == 1 and enc["rejected_ids"].count(eos) == 1
    assert bos not in c
    full = _full_text(t, triple)
    assert t.decode(p + c) == full
    assert t(full, add_special_tokens=False)["input_ids"] == p + c  # prompt ids are a prefix of the joint tokenization
    assert not enc["prompt_truncated"] and not enc["response_truncated"]
    if fmt == "implicit":  # the transcript's turns in the template, or the raw transcript for a base model
        assert prompt_text == ("<s><|user|>\nIs it cold?\n<|assistant|>\nA bit.\n<|user|>\nShould I wear a coat?\n"
                               "<|assistant|>\n" if templated else HH_PROMPT)


def test_transcripts_become_messages_turn_by_turn():
    from qsimpo.data.render import transcript_messages

    assert transcript_messages(HH_PROMPT) == [msg("user", "Is it cold?"), msg("assistant", "A bit."),
                                              msg("user", "Should I wear a coat?")]
    # two Assistant turns in a row (a few real HH-RLHF rows) join: templates want alternation
    doubled = "\n\nHuman: Hi\n\nAssistant: One.\n\nAssistant: Two.\n\nHuman: And?\n\nAssistant:"
    assert transcript_messages(doubled) == [msg("user", "Hi"), msg("assistant", "One.\n\nTwo."), msg("user", "And?")]
    assert transcript_messages("Tell me a joke.\n\nAssistant:") == [msg("user", "Tell me a joke.")]


def _template(gen_suffix: str = "", answer_prefix: str = "", system: bool = True) -> str:
    reject = "" if system else "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    return (reject + "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
            "{% if m['role'] == 'assistant' %}" + answer_prefix + "{% endif %}{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n" + gen_suffix + "{% endif %}")


def test_text_the_template_adds_after_the_assistant_header_stays_in_the_prompt():
    t = build_tokenizer(_corpus()[:50])
    t.chat_template = _template(gen_suffix="[think][/think]", answer_prefix="[think][/think]")
    prompt, chosen, rejected = render_pair(t, CASES["implicit"])
    assert prompt.endswith("<|assistant|>\n[think][/think]") and chosen == "Yes, take a warm coat.\n" and rejected == "Yes, no.\n"


def test_templates_that_break_the_boundary_or_reject_system_are_bad_rows_naming_the_fix(tmp_path):
    t = build_tokenizer(_corpus()[:50])
    t.chat_template = _template(gen_suffix="[think]")  # the generation prompt is not a prefix of the rendered answer
    with pytest.raises(DataError, match="chat_template: the chat template is not prefix-stable"):
        render_pair(t, CASES["implicit"])
    t.chat_template = _template(system=False)  # Gemma-style: no system role
    assert render_pair(t, CASES["explicit"])[0].startswith("<s><|user|>")
    path = write_jsonl(tmp_path / "p.jsonl", [EXPLICIT, {**EXPLICIT, "chosen": "Paris."}])
    with pytest.raises(DataError) as err:
        build_dataset(DataConfig(path=str(path), system_prompt="Be brief."), t)
    assert "chat_template: 2 rows" in str(err.value) and "System role not supported" in str(err.value)
    assert "data.system_prompt: null" in str(err.value)


def test_rendering_without_template_and_with_system_prompt(tok, tok_plain):
    conv = CASES["conversational"]
    assert render_pair(tok_plain, conv) == ("user: Name a red fruit.\nassistant:", " A cherry.", " Blue.")
    assert render_pair(tok_plain, CASES["explicit"])[0] == EXPLICIT["prompt"]
    prompt, chosen, _ = render_pair(tok, conv, system_prompt="Be kind.")
    assert prompt == "<s><|system|>\nBe kind.\n<|user|>\nName a red fruit.\n<|assistant|>\n" and chosen == "A cherry.\n"
    with_system = {**conv, "prompt": [msg("system", "Own.")] + conv["prompt"]}
    assert render_pair(tok, with_system, system_prompt="Be kind.")[0].count("<|system|>") == 1


def test_eos_from_template_is_not_doubled():
    t = build_tokenizer(_corpus()[:50])
    t.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                       "{{ eos_token if m['role'] == 'assistant' else '' }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    enc = tokenize_pair(t, CASES["conversational"], 512, 256)
    assert render_pair(t, CASES["conversational"])[1] == "A cherry.</s>\n"
    assert enc["chosen_ids"][-1] == t.eos_token_id and enc["chosen_ids"].count(t.eos_token_id) == 1


def test_template_that_is_not_prefix_stable_is_refused():
    t = build_tokenizer(_corpus()[:50])
    t.chat_template = ("{{ bos_token }}{% if add_generation_prompt %}[gen]{% endif %}"
                       "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(DataError, match="not prefix-stable"):
        tokenize_pair(t, CASES["explicit"], 512, 256)


def test_tokenizer_without_bos_adds_none(tok_plain):
    t = build_tokenizer(_corpus()[:50], chat_template=False)
    t.bos_token = None
    enc = tokenize_pair(t, CASES["implicit"], 512, 256)
    assert tok_plain.bos_token_id not in enc["prompt_ids"]
    assert t.decode(enc["prompt_ids"]) == HH_PROMPT


def test_truncation_never_leaves_an_empty_response(tok):
    long_prompt = " ".join(f"The number {i} is a word." for i in range(40))
    triple = {"prompt": long_prompt, "chosen": "A long chosen answer. " * 15, "rejected": "Short.", "format": "explicit"}
    full = tokenize_pair(tok, triple, 10_000, 9_999)
    P, C, R = full["prompt_ids"], full["chosen_ids"], full["rejected_ids"]
    assert len(P) > 100 and len(C) > 50 and len(R) < 10
    checked = 0
    for max_length in range(2, len(P) + len(C) + 5, 3):
        for max_prompt_length in {m for m in (1, 2, max_length // 2, max_length - 1) if 1 <= m < max_length}:
            enc = tokenize_pair(tok, triple, max_length, max_prompt_length)
            assert enc is not None, (max_length, max_prompt_length)
            p, c, r = enc["prompt_ids"], enc["chosen_ids"], enc["rejected_ids"]
            assert len(c) >= 1 and len(r) >= 1
            assert len(p) + max(len(c), len(r)) <= max_length
            assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
            assert p[1:] == P[len(P) - len(p) + 1:]  # cut from the left, BOS kept
            assert c == C[: len(c)] and r == R[: len(r)]  # cut from the right
            assert enc["prompt_truncated"] == (len(p) < len(P))
            assert enc["response_truncated"] == (len(c) < len(C) or len(r) < len(R))
            if len(P) + len(C) <= max_length:
                assert (p, c, r) == (P, C, R)
            checked += 1
    assert checked > 100


def test_pair_that_cannot_fit_is_dropped_as_too_long(tmp_path, tok):
    long = {**EXPLICIT, "prompt": " ".join(f"The number {i} is a word." for i in range(10))}
    assert tokenize_pair(tok, long, max_length=20, max_prompt_length=30) is None  # prompt fits 30, leaves no room
    path = write_jsonl(tmp_path / "d.jsonl", [EXPLICIT, long, EXPLICIT])
    pairs, summary = build_dataset(DataConfig(path=str(path), max_length=40, max_prompt_length=45), tok)
    assert summary.dropped["too_long"] == 1 and summary.kept == len(pairs) == 2
    assert [p["location"] for p in pairs] == [f"{path}:line 1", f"{path}:line 3"]
    assert pairs[0]["text"] == {**EXPLICIT, "format": "explicit"}
    with pytest.raises(DataError, match="no usable pairs"):
        build_dataset(DataConfig(path=str(path), max_length=5, max_prompt_length=30), tok)


def test_summary_line_and_dict():
    s = DataSummary("d.jsonl", rows_read=1500, kept=1480, truncated_prompt=300, truncated_response=40, format="implicit")
    s.dropped.update(too_long=12, identical_pair=8)
    assert s.line() == ("data d.jsonl: 1500 rows read, 1480 kept, 20 dropped (too_long 12, identical_pair 8); "
                        "300 prompts truncated, 40 responses truncated; format implicit")
    assert s.to_dict()["dropped"]["too_long"] == 12 and s.to_dict()["source"] == "d.jsonl"
    assert "0 dropped;" in DataSummary("x", rows_read=1, kept=1).line()


def test_build_dataset_path_override_and_summary(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [TRL, ULTRA, TRL])
    held = write_jsonl(tmp_path / "held.jsonl", [ULTRA])
    cfg = DataConfig(path=str(train), max_length=64, max_prompt_length=32)
    pairs, summary = build_dataset(cfg, tok)
    assert summary.line() == (f"data {train}: 3 rows read, 3 kept, 0 dropped; 0 prompts truncated, 0 responses truncated; "
                              "format conversational")
    eval_pairs, eval_summary = build_dataset(cfg, tok, path=str(held))
    assert eval_summary.source == str(held) and len(eval_pairs) == 1
    assert eval_pairs[0]["prompt_ids"] == pairs[1]["prompt_ids"]


def test_split_eval_is_deterministic_disjoint_and_never_empty():
    pairs = [{"i": i} for i in range(50)]
    train, held = split_eval(pairs, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert sorted(p["i"] for p in train + held) == list(range(50))
    assert split_eval(pairs, 0.1, seed=3) == (train, held)
    assert split_eval(pairs, 0.1, seed=4)[1] != held
    assert len(split_eval(pairs, 0.001, seed=0)[1]) == 1
    with pytest.raises(DataError, match="at least 2"):
        split_eval(pairs[:1], 0.5, seed=0)


# -------------------------------------------------------------------------------------------- batches
def test_collator_masks_and_padding():
    feats = [{"prompt_ids": [1, 10, 11], "chosen_ids": [20, 2], "rejected_ids": [30, 31, 32, 2]},
             {"prompt_ids": [1, 12], "chosen_ids": [21, 22, 23, 24, 25, 2], "rejected_ids": [33, 2]}]
    batch = PairCollator(pad_token_id=0)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "response_mask"}
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][0].tolist() == [1, 10, 11, 20, 2, 0, 0, 0]  # chosen rows first
    assert batch["input_ids"][2].tolist() == [1, 10, 11, 30, 31, 32, 2, 0]  # then rejected rows
    assert batch["response_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    lengths = [2, 6, 4, 2]
    assert batch["response_mask"].sum(1).tolist() == lengths
    assert batch["attention_mask"].sum(1).tolist() == [5, 8, 7, 4]
    assert not bool((batch["response_mask"].bool() & ~batch["attention_mask"].bool()).any())
    assert bool((batch["input_ids"][batch["attention_mask"] == 0] == 0).all())
    assert batch["input_ids"].dtype == torch.long
    padded = PairCollator(pad_token_id=0, pad_to_multiple_of=16)(feats)
    assert padded["input_ids"].shape == (4, 16) and padded["response_mask"].sum(1).tolist() == lengths
    with pytest.raises(ValueError, match="pad_token"):
        PairCollator(pad_token_id=None)


def test_format_pair_shows_boundary_and_special_tokens(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [EXPLICIT])
    pairs, _ = build_dataset(DataConfig(path=str(path), max_length=128, max_prompt_length=64), tok)
    text = format_pair(tok, pairs[0])
    n = len(pairs[0]["chosen_ids"])
    assert f"──── chosen response ({n} tokens, masked-in) ────" in text
    assert f"──── prompt ({len(pairs[0]['prompt_ids'])} tokens, masked-out) ────" in text
    assert text.count("<s>") == 1 and text.count("Paris is the capital.\n</s>") == 1
    assert f"{path}:line 1" in text


# ---------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not HH_SAMPLE.is_file(), reason=f"HH-RLHF sample not found at {HH_SAMPLE} (../shared beside the repo)")
def test_real_hh_rlhf_sample():
    rows = [json.loads(line) for line in HH_SAMPLE.read_text().splitlines()[:200]]
    t = build_tokenizer([r[k] for r in rows for k in ("chosen", "rejected")])
    cfg = DataConfig(path=str(HH_SAMPLE), max_rows=200, max_length=128, max_prompt_length=64, on_bad_row="skip")
    pairs, summary = build_dataset(cfg, t)
    assert summary.format == "implicit" and summary.rows_read == 200
    assert summary.kept + sum(summary.dropped.values()) == summary.rows_read
    assert summary.kept >= 190
    assert summary.truncated_prompt >= 50 and summary.truncated_response >= 20
    for p in pairs:
        assert len(p["chosen_ids"]) >= 1 and len(p["rejected_ids"]) >= 1
        assert len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= 128
        assert p["prompt_ids"][0] == t.bos_token_id and p["prompt_ids"].count(t.bos_token_id) == 1
        assert t.decode(p["prompt_ids"]).endswith("<|assistant|>\n")  # rendered with the chat template
        if not p["prompt_truncated"]:
            assert t.decode(p["prompt_ids"]) == render_pair(t, {**p["text"], "location": p["location"]})[0]


def test_a_json_file_is_parsed_once_and_not_on_a_cached_rerun(tmp_path, monkeypatch):
    from qsimpo.data import sources

    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3))
    parsed = []
    real = sources._iter_json
    monkeypatch.setattr(sources, "_iter_json", lambda p, name: parsed.append(name) or real(p, name))
    first = sources.source_table(str(path), fingerprint_salt="t")
    assert len(first) == 3 and len(parsed) == 1
    again = sources.source_table(str(path), fingerprint_salt="t")
    assert again["raw"] == first["raw"] and len(parsed) == 1  # read from the cache


# ------------------------------------------------------------------------------------------ data.columns
def test_columns_map_roles_to_the_data_sets_columns_and_system_becomes_a_system_message(tmp_path):
    rows = [{"system": "Be brief.", "question": "Name a red fruit.", "good": "A cherry.", "bad": "Blue.", "prompt": "unused"},
            {"system": "", "question": "Name a fruit.", "good": "A plum.", "bad": "A car.", "prompt": "unused"}]
    (t, u), summary = triples(tmp_path, rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad",
                                                        "system": "system"})
    assert summary.format == "explicit" and summary.rows_read == 2 and not summary.bad_rows
    assert t["prompt"] == [msg("system", "Be brief."), msg("user", "Name a red fruit.")] and t["format"] == "conversational"
    assert (t["chosen"], t["rejected"]) == ("A cherry.", "Blue.")
    assert (u["prompt"], u["format"]) == ("Name a fruit.", "explicit")  # an empty system column adds nothing
    (h,), _ = triples(tmp_path, [{**HH, "sys": "Be kind."}], columns={"system": "sys"})
    assert h["prompt"] == [msg("system", "Be kind."), msg("user", "Is it cold?"), msg("assistant", "A bit."),
                           msg("user", "Should I wear a coat?")]
    assert (h["chosen"], h["rejected"]) == ("Yes, take a warm coat.", "Yes, no.")
    own = {**ULTRA, "chosen": [msg("system", "Own.")] + ULTRA["chosen"], "rejected": [msg("system", "Own.")] + ULTRA["rejected"]}
    (c,), _ = triples(tmp_path, [{**own, "sys": "Other."}], columns={"system": "sys"})
    assert [m["content"] for m in c["prompt"]] == ["Own.", "Name a red fruit."]  # a conversation keeps its own system message


def test_columns_are_part_of_the_cache_fingerprint(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{**EXPLICIT, "question": "Which city is the capital of France?"}])
    assert read(path)[0]["prompt"] == EXPLICIT["prompt"]
    assert read(path, columns={"prompt": "question"})[0]["prompt"] == "Which city is the capital of France?"
    assert read(path)[0]["prompt"] == EXPLICIT["prompt"]


def test_a_mapped_column_a_row_lacks_is_a_bad_row_naming_column_row_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}, {"chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError) as err:
        read_source(DataConfig(path=str(path), columns={"prompt": "question"}))
    assert (f"{path}:line 2: missing_key: no column 'question' for data.columns.prompt (columns: chosen, rejected); "
            "set data.columns.prompt to the column that holds the prompt") in str(err.value)
    assert err.value.reason == "missing_key"
