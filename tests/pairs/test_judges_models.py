"""Reward models as judges: plain sequence classifiers (Skywork-Reward's kind), models with their own modelling code
(ArmoRM's kind, through auto_map and --trust-remote-code), batching by memory, what is cut, and folders that are no
judge at all, as the user meets them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

# ArmoRM's shape (RLHFlow/ArmoRM-Llama3-8B-v0.1, modeling_custom.py): a Llama body, rewards for several objectives
# mixed by a gate, returned as an output object whose ``score`` is the reward (no logits); the last token found
# as ArmoRM finds it (the position before the first pad token, else the end)
MODELING_CUSTOM = '''
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


@dataclass
class CustomOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    gating_output: torch.FloatTensor = None
    score: torch.FloatTensor = None


class TinyRewardWithGating(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1
        last = last % input_ids.shape[-1]
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rewards = self.regression_layer(h)
        gates = torch.softmax(self.gating(h), dim=-1)
        return CustomOutput(rewards=rewards, gating_output=gates, score=(rewards * gates).sum(-1, keepdim=True))
'''

PROMPTS = ["Tell me about owls.", "Why is the sky blue?"]
ANSWERS = [["Owls hunt at night.", "Owls are birds with large eyes that hunt small animals at night.", "Hoot."],
           ["Because of scattering.", "Light scatters in the air, blue the most.", "It is blue because it is."]]


def user(text):
    return [{"role": "user", "content": text}]


def flat():
    return [user(p) for p, g in zip(PROMPTS, ANSWERS) for _ in g], [a for g in ANSWERS for a in g]


def _llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=kw.pop("positions", 512),
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **kw)


@pytest.fixture(scope="module")
def remote_rm(tiny_base, tmp_path_factory, one_thread):
    """A folder laid out as ArmoRM's: config.json with auto_map, modeling_custom.py beside the weights."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("armorm") / "tiny-armorm"
    folder.mkdir()
    (folder / "modeling_custom.py").write_text(MODELING_CUSTOM)
    sys.path.insert(0, str(folder))
    try:
        from modeling_custom import TinyRewardWithGating
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("modeling_custom", None)
    config = _llama_config(tok, num_objectives=4)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_custom.TinyRewardWithGating"}
    config.architectures = ["TinyRewardWithGating"]
    torch.manual_seed(0)
    model = TinyRewardWithGating(config)
    model.save_pretrained(folder)
    config.save_pretrained(folder)  # keeps auto_map and architectures as the Hub's config.json has them
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain_rm(tiny_base, tmp_path_factory, one_thread):
    """A one-output LlamaForSequenceClassification (Skywork-Reward's kind) that fits 24 tokens."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_llama_config(tok, num_labels=1, positions=24))
    folder = tmp_path_factory.mktemp("rm") / "reward-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def own_score(folder, trust, prompt, answer):
    """The paper's reward_model_annotate.py: apply_chat_template(messages) of one answer, model(ids), .score or logit."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=trust).eval()
    enc = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model(enc["input_ids"])
    return float(out.score if trust else out.logits[0, 0])


def test_custom_code_reward_model_reads_its_own_score(remote_rm, capsys):
    from qsimpo.pairs.scorers import RewardModel, load_scorer

    judge = load_scorer(str(remote_rm), trust_remote_code=True)
    assert isinstance(judge, RewardModel) and judge.remote
    assert "--trust-remote-code: running" in capsys.readouterr().err and "modeling_custom" in judge.model.__module__
    prompts, answers = flat()
    scores = judge(prompts, answers, ["here"] * len(answers))
    for prompt, answer, s in zip(prompts, answers, scores):
        assert s == pytest.approx(own_score(remote_rm, True, prompt, answer), abs=1e-5)
    assert len(set(scores)) == len(scores)


def test_plain_reward_model_batched_by_memory_equals_one_at_a_time(plain_rm):
    from qsimpo.pairs import judges
    from qsimpo.pairs.scorers import load_scorer

    prompts, answers = flat()
    judge = load_scorer(str(plain_rm))
    assert judge.kind == "reward_model" and not judge.remote
    lengths = [len(judge.tokenizer(judge.text(p, a), add_special_tokens=False)["input_ids"]) for p, a in zip(prompts, answers)]
    passes = judges.batches([min(n, judge.limit) for n in lengths], lambda n, L: n * L, 10 ** 9)
    assert len(passes) == 1 and len(set(lengths)) > 1  # one padded pass over answers of different lengths
    together = judge(prompts, answers, ["here"] * len(answers))
    one = load_scorer(str(plain_rm), batch_size=1)
    alone = [one([p], [a], ["here"])[0] for p, a in zip(prompts, answers)]
    assert together == pytest.approx(alone, abs=1e-5)
    short = [i for i, n in enumerate(lengths) if n <= judge.limit]
    for i in short:  # what fits is scored as the model's own forward scores it
        assert together[i] == pytest.approx(own_score(plain_rm, False, prompts[i], answers[i]), abs=1e-5)
    assert judge.truncated == sum(n > 24 for n in lengths) > 0
    assert f"{judge.truncated} prompt + answer texts were longer than the reward model's 24 tokens" in judge.cut_line()


def test_batches_fill_a_budget_longest_first():
    from qsimpo.pairs.judges import batches

    lengths = [3, 9, 5, 9, 2, 5]
    assert batches(lengths, lambda n, L: n * L, 20) == [[1, 3], [2, 5, 0, 4]]  # 2 x 9 and 4 x 5 tokens
    assert batches(lengths, lambda n, L: n * L, 19) == [[1, 3], [2, 5, 0], [4]]
    assert batches(lengths, lambda n, L: n * L, 20, max_rows=1) == [[i] for i in (1, 3, 2, 5, 0, 4)]
    assert batches(lengths, lambda n, L: n * L, 100, equal_lengths=True) == [[1, 3], [2, 5], [0], [4]]
    assert batches([50], lambda n, L: n * L, 10) == [[0]]  # too big alone: a pass of its own


def run_pairs(tmp_path, model, scorer, *extra):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me about owls."}) + "\n")
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([sys.executable, "-m", "qsimpo", "pairs", str(prompts), "--model", str(model), "--scorer",
                           str(scorer), "--out", str(out), *extra], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert "Traceback" not in done.stderr
    return done, out


@pytest.mark.parametrize("case", ["remote code without the flag", "not a model folder", "an adapter"])
def test_folders_that_are_no_judge_are_one_message(case, tiny_base, remote_rm, tiny_adapters, tmp_path):
    if case == "remote code without the flag":
        scorer, expected = remote_rm, [f"error: --scorer {remote_rm} ships its own modelling code "
                                       "(modeling_custom.TinyRewardWithGating)", "--trust-remote-code lets qsimpo "
                                       "import and run the Python files that come with the model"]
    elif case == "not a model folder":
        scorer = tmp_path / "judge"
        scorer.mkdir()
        (scorer / "notes.txt").write_text("x")
        expected = [f"error: --scorer {scorer} is a folder without config.json (it holds: notes.txt)",
                    "PairRM", "module:function", "sequence classifier"]
    else:
        scorer, expected = tiny_adapters[0], [f"error: --scorer {tiny_adapters[0]} is a LoRA adapter", "PairRM"]
    done, out = run_pairs(tmp_path, tiny_base, scorer)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(expected[0]) and all(e in done.stderr for e in expected), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_eval_takes_trust_remote_code():
    done = subprocess.run([sys.executable, "-m", "qsimpo", "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert "--trust-remote-code" in done.stdout and "ArmoRM" in done.stdout
