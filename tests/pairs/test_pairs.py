"""`qsimpo pairs` without a model: choosing pairs, dropping and counting, resuming, scorer specs and checks.

The policy is replaced by a fake sampler (answers looked up by prompt), so these run in well under a second
each; tests/pairs/test_pairs_models.py runs the same command on the tiny model."""

from __future__ import annotations

import json
import sys

import pytest

from qsimpo.errors import OutputExists, UsageError
from qsimpo.pairs import make_pairs
from qsimpo.pairs.examples import concise_complete, concise_complete_batch
from qsimpo.pairs.scorers import load_scorer
from qsimpo.pairs.write import pair_row, unusable
from qsimpo.record import read_settings

PROMPTS = ["Tell me about owls.", "What is rain?", "Name a river.", "Why is the sky blue?", "What is a tie?", "Say it."]
# The answers the fake policy gives: distinct for the first four prompts, all the same text for the fifth, and
# only one with any text for the last.
ANSWERS = {
    "Tell me about owls.": ["Owls hunt at night.", "Owls.", "Owls are birds that hunt at night."],
    "What is rain?": ["Water falling.", "Rain is water falling from clouds.", "Rain."],
    "Name a river.": ["The Nile.", "The Amazon river.", "Nile"],
    "Why is the sky blue?": ["Scattering.", "Because of Rayleigh scattering.", "Light."],
    "What is a tie?": ["Same.", "Same.", "Same."],
    "Say it.": ["", "It.", " "],
}
LENGTH_SCORER = """
import os

calls = []


def by_length(prompt, response):
    calls.append(prompt[-1]["content"])
    fail_after = int(os.environ.get("FAIL_AFTER_PROMPTS", "0"))
    if fail_after and len(set(calls)) > fail_after:
        raise RuntimeError("the scorer broke")
    return len(response)


def constant(prompt, response):
    return 1.0


def nan(prompt, response):
    return float("nan")


def text(prompt, response):
    return "good"


def batched(prompts, responses):
    return [len(r) for r in responses]


batched.batched = True
NOT_A_FUNCTION = 3
"""


@pytest.fixture
def fake_policy(monkeypatch):
    """The policy replaced by ANSWERS; returns the list of prompts each sampling call was given."""
    import qsimpo.pairs.sample as sample

    calls = []

    def fake_sample(model, tokenizer, prompts, prompt_ids, n, temperature, top_p, max_new_tokens, seed, system_prompt=None):
        calls.append([p[-1]["content"] for p in prompts])
        return [ANSWERS[p[-1]["content"]][:n] for p in prompts], 7 * n * len(prompts), 0

    monkeypatch.setitem(sys.modules, "vllm", None)  # backend auto: transformers' sample, the one replaced here
    monkeypatch.setattr(sample, "load_policy", lambda *a, **k: (None, None, "fake"))
    monkeypatch.setattr(sample, "sample", fake_sample)
    return calls


@pytest.fixture
def files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    scorer = tmp_path / "my_scorers.py"
    scorer.write_text(LENGTH_SCORER)
    return prompts, scorer, tmp_path / "out" / "pairs.jsonl"


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(prompts, scorer, out, **kw):
    return make_pairs(str(prompts), "fake-model", scorer, str(out), n=3, **kw)


def test_pair_row_best_vs_worst_and_drops():
    user = [{"role": "user", "content": "Hi"}]
    row, reason = pair_row(user, ["a", "bbb", "cc"], [1.0, 3.0, 2.0])
    assert reason is None and row["prompt"] == "Hi"
    assert row["chosen"] == user + [{"role": "assistant", "content": "bbb"}]
    assert row["rejected"] == user + [{"role": "assistant", "content": "a"}]
    assert row["all_generations"] == ["a", "bbb", "cc"] and row["all_rm_scores"] == [1.0, 3.0, 2.0]
    assert pair_row(user, ["a", "b"], [2.0, 2.0]) == (None, "tie")
    assert pair_row(user, ["a", "a", "b"], [1.0, 1.0, 1.5])[0]["rejected"][-1]["content"] == "a"
    assert pair_row(user, ["a", "a"], [1.0, 1.5]) == (None, "tie")  # the same text never becomes chosen and rejected
    system = [{"role": "system", "content": "Be brief."}] + user
    assert pair_row(system, ["a", "b"], [0.0, 1.0])[0]["prompt"] == system
    assert unusable(["x", "x", "x"]) == "identical_samples"
    assert unusable(["", "x", "  "]) == "empty_samples"
    assert unusable(["x", "y"]) is None


def test_example_scorer_rewards_a_finished_concise_answer():
    user = [{"role": "user", "content": "Hi"}]
    assert concise_complete(user, "Owls hunt at night.") == 1.0
    assert concise_complete(user, "Owls hunt at") == 0.0  # cut mid-sentence
    assert concise_complete(user, "") == -1.0
    long = " ".join(["word"] * 80) + "."
    assert concise_complete(user, long) == pytest.approx(1.0 - 0.02 * 20)
    assert concise_complete_batch([user, user], ["Yes.", "Yes"]) == [1.0, 0.0]


def test_file_spec_writes_pairs_drops_and_counts(fake_policy, files, capsys):
    prompts, scorer, out = files
    summary = run(prompts, f"{scorer}:by_length", out)
    got = rows(out)
    assert [r["prompt"] for r in got] == PROMPTS[:4]
    owls = got[0]
    assert owls["chosen"][-1]["content"] == "Owls are birds that hunt at night."
    assert owls["rejected"][-1]["content"] == "Owls."
    assert owls["all_rm_scores"] == [19.0, 5.0, 34.0]
    dropped = {r["location"].rsplit(" ", 1)[-1]: r["reason"] for r in rows(out.parent / "pairs.jsonl.dropped.jsonl")}
    assert dropped == {"5": "identical_samples", "6": "empty_samples"}
    assert rows(out.parent / "pairs.jsonl.dropped.jsonl")[0]["all_generations"] == ["Same."] * 3
    assert summary["dropped"] == {"identical_samples": 1, "empty_samples": 1, "tie": 0}
    gaps = [max(r["all_rm_scores"]) - min(r["all_rm_scores"]) for r in got]
    assert summary["mean_best_minus_worst"] == pytest.approx(sum(gaps) / 4)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"pairs {out}: 6 prompts read, 4 pairs written (4 this run), 2 dropped (identical_samples 1, "
                    f"empty_samples 1); mean best - worst score {sum(gaps) / 4:.4g}")


def test_ties_dropped_and_not_redone(fake_policy, files):
    prompts, scorer, out = files
    summary = run(prompts, f"{scorer}:constant", out)
    assert not out.exists() or not out.read_text()
    assert summary["dropped"] == {"identical_samples": 1, "empty_samples": 1, "tie": 4}
    assert summary["mean_best_minus_worst"] is None
    calls = len(fake_policy)
    again = run(prompts, f"{scorer}:constant", out)
    assert len(fake_policy) == calls  # the rerun sampled nothing: every prompt is recorded as dropped
    assert again["dropped"] == summary["dropped"] and again["pairs_written"] == 0


def test_resume_after_max_prompts_and_after_a_crash(fake_policy, files, monkeypatch):
    prompts, scorer, out = files
    spec = f"{scorer}:by_length"
    first = run(prompts, spec, out, max_prompts=2)
    assert first["pairs_written"] == 2 and first["left_by_max_prompts"] == 4
    head = out.read_text()
    monkeypatch.setenv("FAIL_AFTER_PROMPTS", "1")  # the scorer raises on the second prompt it sees
    with pytest.raises(RuntimeError, match="the scorer broke"):
        run(prompts, spec, out, batch_size=1)
    assert out.read_text().startswith(head) and len(rows(out)) == 3  # the prompt finished before the crash is kept
    with out.open("a") as f:
        f.write('{"prompt_id": "cut mid-wr')  # a write cut short by a hard kill
    monkeypatch.delenv("FAIL_AFTER_PROMPTS")
    last = run(prompts, spec, out)
    got = rows(out)
    assert [r["prompt"] for r in got] == PROMPTS[:4]  # each once, in order, none lost
    assert len({r["prompt_id"] for r in got}) == 4
    assert last["pairs_written"] == 4 and last["pairs_written_now"] == 1
    assert sum(last["dropped"].values()) == 2
    sampled = [p for call in fake_policy for p in call]
    assert sampled.count(PROMPTS[0]) == 1 and sampled.count(PROMPTS[1]) == 1


def test_other_settings_or_a_foreign_file_are_refused(fake_policy, files):
    prompts, scorer, out = files
    run(prompts, f"{scorer}:by_length", out, max_prompts=1)
    with pytest.raises(OutputExists, match=r"other settings \(n 3 -> 4\)"):
        make_pairs(str(prompts), "fake-model", f"{scorer}:by_length", str(out), n=4)
    foreign = out.parent / "mine.jsonl"
    foreign.write_text('{"a": 1}\n')
    with pytest.raises(OutputExists, match="not written by `qsimpo pairs`"):
        run(prompts, f"{scorer}:by_length", foreign)


def test_module_spec_and_batched_scorer(fake_policy, files, monkeypatch):
    prompts, scorer, out = files
    monkeypatch.chdir(scorer.parent)  # module:function imports from the current folder, as a user types it
    summary = run(prompts, "my_scorers:batched", out)
    assert summary["pairs_written"] == 4
    assert rows(out)[0]["all_rm_scores"] == [19.0, 5.0, 34.0]


@pytest.mark.parametrize("name,message", [
    ("nan", r"returned nan for the prompt at .*prompts.jsonl:line 1 \('Tell me about owls.'\); a score must be a finite"),
    ("text", r"returned 'good' \(a str\) for the prompt at .*line 1 .*a score is a real number"),
])
def test_bad_scores_name_the_prompt(fake_policy, files, name, message):
    prompts, scorer, out = files
    with pytest.raises(UsageError, match=message):
        run(prompts, f"{scorer}:{name}", out)


def test_bad_scorer_specs(files, tmp_path):
    _, scorer, _ = files
    with pytest.raises(UsageError, match="has no 'missing' \\(its functions: batched, by_length, constant, nan, text\\)"):
        load_scorer(f"{scorer}:missing")
    imports = tmp_path / "imports.py"  # names a module imports are not its functions
    imports.write_text("from dataclasses import dataclass\nfrom typing import Callable\n\n\ndef mine(prompt, response):\n"
                       "    return 1.0\n")
    with pytest.raises(UsageError, match=r"has no 'helpful' \(its functions: mine\)$"):
        load_scorer(f"{imports}:helpful")
    with pytest.raises(UsageError, match="'NOT_A_FUNCTION' in the file .* is a int, not a function"):
        load_scorer(f"{scorer}:NOT_A_FUNCTION")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(UsageError, match="does not import: SyntaxError"):
        load_scorer(f"{broken}:f")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_scorer(f"{tmp_path}/absent.py:f")


def test_prompt_rows_read_by_the_data_pipeline(tmp_path):
    from qsimpo.config import DataConfig
    from qsimpo.data import DataError, read_source

    path = tmp_path / "mixed.jsonl"
    user = [{"role": "user", "content": "Hi"}]
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Tell me about owls."},
        {"prompt": [{"role": "system", "content": "Be brief."}, *user]},
        {"prompt": [*user, {"role": "assistant", "content": "Yo"}]},  # nothing left to answer
        {"prompt": ""},
        {"question": "no prompt"},
    ]) + "\n")
    with pytest.raises(DataError, match="3 bad rows of 5"):
        read_source(DataConfig(path=str(path)), prompts=True)
    source = read_source(DataConfig(path=str(path), on_bad_row="skip"), prompts=True)
    assert [t["prompt"] for t in source.texts()] == ["Tell me about owls.", [{"role": "system", "content": "Be brief."}, *user]]
    assert {k: v for k, v in source.summary.dropped.items() if v} == {"no_user_turn": 1, "empty_text": 1, "missing_key": 1}
    pairs = tmp_path / "pairs.jsonl"  # preference rows: the conversation before the answer, equal answers or not
    pairs.write_text(json.dumps({"chosen": [*user, {"role": "assistant", "content": "A"}],
                                 "rejected": [*user, {"role": "assistant", "content": "A"}]}) + "\n")
    assert [t["prompt"] for t in read_source(DataConfig(path=str(pairs)), prompts=True).texts()] == [user]


def test_sampler_keeps_the_nucleus_as_transformers_does():
    import torch
    from transformers import TopPLogitsWarper

    from qsimpo.generate import RowSampler

    logits = torch.tensor([[10.0, 9.0, 0.0, -5.0]]).repeat(200, 1)
    for top_p, allowed in ((0.5, {0}), (0.9, {0, 1}), (1.0, {0, 1, 2, 3})):
        temperature = 10.0 if top_p == 1.0 else 1.0
        out = RowSampler(range(200), [temperature] * 200, [top_p] * 200)(None, logits.clone())
        picks = out.argmax(-1)
        assert (out.isfinite().sum(-1) == 1).all()  # exactly one token left per row: greedy decoding emits it
        assert set(picks.tolist()) == allowed
        kept = TopPLogitsWarper(top_p)(None, logits[:1].clone()).isfinite()[0].nonzero().flatten().tolist()
        assert set(kept) == allowed or top_p == 1.0
    draw = lambda: RowSampler(range(200), [1.0] * 200, [0.9] * 200)(None, logits.clone())  # noqa: E731
    assert torch.equal(draw(), draw())  # the same seeds, the same tokens
    greedy = RowSampler(range(2), [0.0, 1.0], [0.9, 0.9])(None, logits[:2].clone())
    assert torch.equal(greedy[0], logits[0])  # a row at temperature 0 is left to greedy decoding


def test_prompts_from_a_preference_data_set_folder(fake_policy, files, tmp_path):
    """UltraFeedback's layout (a prompt string copied into whole conversations, extra columns) in a DatasetDict
    folder, read with --split: each row's prompt is the conversation before the answer."""
    import datasets

    _, scorer, out = files
    convo = lambda p, a: [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    rows_ = [{"prompt": p, "prompt_id": str(i), "chosen": convo(p, "A"), "rejected": convo(p, "B"), "score_chosen": 8.0}
             for i, p in enumerate(PROMPTS[:3])]
    folder = tmp_path / "ultrafeedback"
    datasets.DatasetDict({"test_prefs": datasets.Dataset.from_list(rows_)}).save_to_disk(str(folder))
    summary = make_pairs(str(folder), "fake-model", f"{scorer}:by_length", str(out), n=3, split="test_prefs")
    assert summary["prompts_read"] == 3 and summary["pairs_written"] == 3
    assert [r["prompt"] for r in rows(out)] == PROMPTS[:3]
    assert fake_policy == [PROMPTS[:3]]


def test_a_prompt_column_of_another_name(fake_policy, files, tmp_path):
    _, scorer, out = files
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": p, "output": "x"} for p in PROMPTS[:2]]))
    with pytest.raises(UsageError) as e:
        make_pairs(str(alpaca), "fake-model", f"{scorer}:by_length", str(out), n=3)
    assert "no 'prompt' key (keys: instruction, output)" in str(e.value)
    assert "--prompt-column (e.g. --prompt-column instruction)" in str(e.value) and "data." not in str(e.value)
    summary = make_pairs(str(alpaca), "fake-model", f"{scorer}:by_length", str(out), n=3, prompt_column="instruction")
    assert summary["pairs_written"] == 2 and [r["prompt"] for r in rows(out)] == PROMPTS[:2]


def test_a_base_models_prompts_take_the_system_prompt_training_will_use(fake_policy, files, monkeypatch):
    """`--system-prompt`: a base model records none, so the prompts are rendered with the one given (the training
    config's data.system_prompt); it is part of the settings a resume must match."""
    import qsimpo.pairs.sample as sample
    from qsimpo.cli import main

    prompts, scorer, out = files
    systems = []
    answer = sample.sample  # fake_policy's

    def recording(*args, system_prompt=None):
        systems.append(system_prompt)
        return answer(*args, system_prompt=system_prompt)

    monkeypatch.setattr(sample, "sample", recording)
    spec = f"{scorer}:by_length"
    assert main(["pairs", str(prompts), "--model", "fake-model", "--scorer", spec, "--out", str(out),
                 "--num-samples", "3", "--system-prompt", "Be brief.", "--max-prompts", "2"]) == 0
    assert systems and set(systems) == {"Be brief."}
    assert read_settings(f"{out}.settings.json")["system_prompt"] == "Be brief."
    with pytest.raises(OutputExists, match=r"other settings \(system_prompt 'Be brief.' -> None\)"):
        make_pairs(str(prompts), "fake-model", spec, str(out), n=3)
    systems.clear()
    run(prompts, spec, out.parent / "plain.jsonl", max_prompts=1)
    assert set(systems) == {None}  # a base model and no --system-prompt: no system message, as before
