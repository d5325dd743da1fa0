"""`qsimpo pairs` on the tiny model: a base and an adapter as the policy, a Python scorer and a reward model, the
output read back by the training data path, and answers that do not depend on the batch they were drawn in."""

from __future__ import annotations

import json

import pytest
import torch

from qsimpo.pairs import make_pairs

SCORER = "def by_length(prompt, response):\n    return len(response)\n"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory, pref_rows):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    seen = list(dict.fromkeys(r["prompt"] for r in pref_rows))[:3]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in seen))
    return path


@pytest.fixture(scope="module")
def reward_model(tiny_base, tmp_path_factory):
    """A one-output LlamaForSequenceClassification with the tiny tokenizer (and its chat template), saved."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path_factory.mktemp("rm") / "reward-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def base_pairs(tiny_base, prompts, tmp_path_factory):
    """The tiny base as the policy, a file scorer (the answer's length): (output file, summary)."""
    folder = tmp_path_factory.mktemp("base-pairs")
    scorer = folder / "scorer.py"
    scorer.write_text(SCORER)
    out = folder / "pairs.jsonl"
    return out, make_pairs(str(prompts), str(tiny_base), f"{scorer}:by_length", str(out), n=3, max_new_tokens=8,
                           batch_size=2, backend="transformers", device="cpu")


def test_base_policy_with_a_file_scorer_reads_back_as_training_data(tiny_base, base_pairs):
    from qsimpo.config import DataConfig, ModelConfig
    from qsimpo.data import build_dataset, read_source
    from qsimpo.train.model import load_tokenizer

    out, summary = base_pairs
    got = rows(out)
    assert summary["pairs_written"] == len(got) >= 2
    assert summary["pairs_written"] + sum(summary["dropped"].values()) == 3
    for row in got:
        assert len(row["all_generations"]) == 3 and row["all_rm_scores"] == [float(len(a)) for a in row["all_generations"]]
        assert row["chosen"][0] == {"role": "user", "content": row["prompt"]}
        assert row["chosen"][-1]["content"] != row["rejected"][-1]["content"]
    source = read_source(DataConfig(path=str(out)))  # format auto, as `qsimpo train` reads it
    assert source.summary.format == "conversational" and not source.summary.bad_rows
    assert [t["prompt"] for t in source.texts()] == [[{"role": "user", "content": r["prompt"]}] for r in got]
    pairs, data = build_dataset(DataConfig(path=str(out), max_length=96), load_tokenizer(ModelConfig(name_or_path=str(tiny_base))))
    assert data.kept == len(got) == len(pairs)


def test_qsimpo_train_trains_on_the_pairs(tiny_base, base_pairs, tmp_path):
    from conftest import make_config
    from qsimpo.train.recipe import train

    out, summary = base_pairs
    run = train(make_config(tiny_base, out, tmp_path / "run", "--train.max_steps", "1"))
    meta = json.loads((run.output_dir / "qsimpo.json").read_text())
    assert meta["data"]["train"]["kept"] == summary["pairs_written"] and meta["global_step"] == 1


def test_answers_do_not_depend_on_the_batch(tiny_base):
    from qsimpo.pairs.sample import load_policy, sample

    policy, tok, _ = load_policy(str(tiny_base), device="cpu")
    a = [{"role": "user", "content": "Tell me about owls."}]
    b = [{"role": "user", "content": "What is rain? Answer in one long sentence please."}]
    together, _, _ = sample(policy, tok, [b, a], ["b", "a"], 3, 0.8, 0.95, 8, seed=1)
    alone, _, _ = sample(policy, tok, [a], ["a"], 3, 0.8, 0.95, 8, seed=1)
    assert together[1] == alone[0]
    other_seed, _, _ = sample(policy, tok, [a], ["a"], 3, 0.8, 0.95, 8, seed=2)
    assert other_seed[0] != alone[0]


def test_adapter_policy_with_a_reward_model(tiny_adapters, reward_model, prompts, tmp_path):
    from qsimpo.pairs.scorers import load_scorer

    out = tmp_path / "pairs.jsonl"
    summary = make_pairs(str(prompts), str(tiny_adapters[0]), str(reward_model), str(out), n=3, max_new_tokens=8,
                         backend="transformers", device="cpu")
    got = rows(out)
    assert summary["pairs_written"] == len(got) >= 1
    rm = load_scorer(str(reward_model), "cpu", batch_size=1)  # each answer alone: batching must not change a score
    for row in got:
        user = [{"role": "user", "content": row["prompt"]}]
        alone = rm([user] * 3, row["all_generations"], ["here"] * 3)
        assert row["all_rm_scores"] == pytest.approx(alone, abs=1e-4)
        assert row["chosen"][-1]["content"] == row["all_generations"][max(range(3), key=lambda i: alone[i])]


def test_a_causal_lm_is_not_a_reward_model(tiny_base):
    from qsimpo.errors import UsageError
    from qsimpo.pairs.scorers import load_scorer

    with pytest.raises(UsageError, match=r"is not a sequence classifier \(its architectures: LlamaForCausalLM\)"):
        load_scorer(str(tiny_base))


@pytest.mark.gpu
def test_sampling_on_the_gpu_does_not_depend_on_the_batch(tiny_base):
    from qsimpo.pairs.sample import load_policy, sample

    policy, tok, _ = load_policy(str(tiny_base), device="cuda:0")
    a = [{"role": "user", "content": "Tell me about owls."}]
    b = [{"role": "user", "content": "What is rain? Answer in one long sentence please."}]
    together, _, _ = sample(policy, tok, [b, a], ["b", "a"], 4, 0.8, 0.95, 16, seed=1)
    alone, _, _ = sample(policy, tok, [a], ["a"], 4, 0.8, 0.95, 16, seed=1)
    assert together[1] == alone[0]
