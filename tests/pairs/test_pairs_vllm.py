"""`qsimpo pairs --backend vllm` against a fake ``vllm`` module (classes that record what they are given and answer
with canned outputs shaped like vLLM's RequestOutput) on a machine that claims a CUDA GPU: the requests built, the
rows written, the choice ``auto`` makes, the errors, and the backend recorded in the settings. The real vLLM runs in
the gpu tier (the last test)."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from qsimpo.errors import InputNotFound, OutputExists, UsageError
from qsimpo.pairs import make_pairs
from qsimpo.pairs.vllm_backend import load_vllm, resolve_backend

SCORER = "def by_length(prompt, response):\n    return len(response)\n"
OWLS = [{"role": "user", "content": "Tell me about owls."}]
RAIN = [{"role": "user", "content": "What is rain?"}]


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        self.kwargs = kwargs


class LoRARequest:
    def __init__(self, lora_name, lora_int_id, lora_path=""):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


def TokensPrompt(**kwargs):  # a TypedDict in vLLM: a plain dict
    return dict(kwargs)


class LLM:
    """Answer k of a request: "owls" said k + 1 times and a stop token; the last answer is cut at max_tokens.
    Outputs come back with their indexes reversed, to check they are put in order."""

    made: list[LLM] = []
    tokenizer = None

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        LLM.made.append(self)

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        self.calls.append(SimpleNamespace(prompts=prompts, params=sampling_params, lora=lora_request, use_tqdm=use_tqdm))
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            assert isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}
            answers = []
            for k in range(params.n):
                last = k == params.n - 1
                ids = LLM.tokenizer(" ".join(["owls"] * (20 if last else k + 1)), add_special_tokens=False).input_ids
                ids = ids[:params.max_tokens] if last else ids + [params.stop_token_ids[0], 5, 6]
                answers.append(SimpleNamespace(index=k, text="ignored", token_ids=tuple(ids),
                                               finish_reason="length" if last else "stop"))
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=answers[::-1]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch, tiny_base):
    """A fake vllm in sys.modules, and torch saying a CUDA GPU is there; returns the list of LLMs made."""
    from transformers import AutoTokenizer

    vllm, lora, request = (types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request"))
    vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt, vllm.lora = LLM, SamplingParams, TokensPrompt, lora
    lora.request, request.LoRARequest = request, LoRARequest
    for module in (vllm, lora, request):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(LLM, "made", [])
    monkeypatch.setattr(LLM, "tokenizer", AutoTokenizer.from_pretrained(tiny_base))
    return LLM.made


@pytest.fixture
def files(tmp_path, pref_rows):
    prompts = tmp_path / "prompts.jsonl"
    seen = list(dict.fromkeys(r["prompt"] for r in pref_rows))[:3]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in seen))
    scorer = tmp_path / "scorer.py"
    scorer.write_text(SCORER)
    return prompts, f"{scorer}:by_length", tmp_path / "out" / "pairs.jsonl"


def expected_stops(tiny_base, tok):
    from transformers import AutoModelForCausalLM

    from qsimpo.generate import model_stop_ids

    return model_stop_ids(AutoModelForCausalLM.from_pretrained(tiny_base), tok)


def test_the_requests_for_a_base(fake_vllm, tiny_base):
    from qsimpo.generate import prompt_ids
    from qsimpo.pairs.sample import sample_seed

    policy = load_vllm(str(tiny_base), seed=3)
    (llm,) = fake_vllm
    assert llm.kwargs["model"] == str(tiny_base) and llm.kwargs["dtype"] == "auto" and llm.kwargs["seed"] == 3
    assert "enable_lora" not in llm.kwargs and policy.lora is None
    stops = expected_stops(tiny_base, policy.tokenizer)
    assert stops and policy.stops == stops
    answers, tokens, cut = policy([OWLS, RAIN], ["owls", "rain"], 3, 0.7, 0.9, 12, 3)
    (call,) = llm.calls
    assert [p["prompt_token_ids"] for p in call.prompts] == [prompt_ids(policy.tokenizer, m) for m in (OWLS, RAIN)]
    assert [p.seed for p in call.params] == [sample_seed(3, "owls", 0), sample_seed(3, "rain", 0)]
    for p in call.params:
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.stop_token_ids) == (3, 0.7, 0.9, 12, stops)
    assert call.lora is None and call.use_tqdm is False
    # in index order, cut after the first stop token, decoded without special tokens; the last one ran to max_tokens
    assert [a[:2] for a in answers] == [["owls", "owls owls"]] * 2
    assert all(a[2].startswith("owls owls") and len(a[2]) > len("owls owls") for a in answers)
    words = [len(LLM.tokenizer(" ".join(["owls"] * k), add_special_tokens=False).input_ids) for k in (1, 2)]
    assert cut == 2 and tokens == 2 * (words[0] + words[1] + 12)  # the stop tokens are not counted


def test_an_adapter_runs_through_vllms_lora_on_its_recorded_base(fake_vllm, tiny_base, tiny_adapters):
    adapter = tiny_adapters[0]
    policy = load_vllm(str(adapter))
    (llm,) = fake_vllm
    assert llm.kwargs["model"] == str(tiny_base)  # the base its qsimpo.json records
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8  # r 4: the smallest rank vLLM takes
    assert policy.lora.lora_path == str(adapter.resolve()) and policy.lora.lora_int_id == 1
    policy([OWLS], ["owls"], 2, 0.8, 0.95, 8, 0)
    assert llm.calls[0].lora is policy.lora
    with pytest.raises(UsageError, match="goes with an adapter"):
        load_vllm(str(tiny_base), base=str(tiny_base))


def test_make_pairs_with_vllm_writes_rows_training_reads(fake_vllm, tiny_base, files):
    from qsimpo.config import DataConfig, ModelConfig
    from qsimpo.data import build_dataset, read_source
    from qsimpo.train.model import load_tokenizer

    prompts, scorer, out = files
    summary = make_pairs(str(prompts), str(tiny_base), scorer, str(out), n=3, max_new_tokens=12, backend="vllm",
                         device="cpu")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["pairs_written"] == len(rows) == 3 and summary["answers_cut_at_max_new_tokens"] == 3
    for row in rows:
        assert row["all_generations"][:2] == ["owls", "owls owls"]
        assert row["chosen"][-1]["content"] == row["all_generations"][2] and row["rejected"][-1]["content"] == "owls"
    record = json.loads(out.with_name("pairs.jsonl.settings.json").read_text())  # {"command", "settings", "versions"}
    assert record["settings"]["backend"] == "vllm" and record["versions"]["qsimpo"]
    source = read_source(DataConfig(path=str(out)))
    assert source.summary.format == "conversational" and not source.summary.bad_rows
    pairs, data = build_dataset(DataConfig(path=str(out), max_length=96), load_tokenizer(ModelConfig(name_or_path=str(tiny_base))))
    assert data.kept == len(pairs) == 3
    # auto on this (claimed) CUDA machine with vllm resolves to vllm: the same settings, so it resumes with nothing to do
    again = make_pairs(str(prompts), str(tiny_base), scorer, str(out), n=3, max_new_tokens=12, device="cpu")
    assert again["pairs_written_now"] == 0 and len(fake_vllm) == 1
    with pytest.raises(OutputExists, match=r"backend 'vllm' -> 'transformers'"):
        make_pairs(str(prompts), str(tiny_base), scorer, str(out), n=3, max_new_tokens=12, backend="transformers",
                   device="cpu")


def test_auto_picks_transformers_without_cuda_or_vllm(fake_vllm, tiny_base, monkeypatch, capsys):
    assert resolve_backend("auto", str(tiny_base)) == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", str(tiny_base)) == "transformers"
    with pytest.raises(UsageError, match="--backend vllm: vLLM samples on a CUDA GPU and none is visible"):
        resolve_backend("vllm", str(tiny_base))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert resolve_backend("auto", str(tiny_base)) == "transformers"
    assert capsys.readouterr().out == ""  # nothing to say where vLLM could not be used anyway
    with pytest.raises(UsageError, match=r"vLLM is not installed: pip install vllm"):
        resolve_backend("vllm", str(tiny_base))
    assert resolve_backend("transformers", str(tiny_base)) == "transformers"
    with pytest.raises(UsageError, match="--backend tpu: choose one of auto, transformers, vllm"):
        resolve_backend("tpu", str(tiny_base))


def test_gguf_and_torchrun_fall_back_under_auto_and_are_refused_under_vllm(fake_vllm, tiny_base, tmp_path, monkeypatch,
                                                                           capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_backend("auto", str(gguf)) == "transformers"
    assert "sampling with transformers, not vLLM: a .gguf base" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"\.gguf base .* is not supported by the vLLM backend"):
        resolve_backend("vllm", str(gguf))
    with pytest.raises(InputNotFound, match="--model ./absent-model: no such file or folder"):
        resolve_backend("auto", "./absent-model")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="runs in one process"):
        resolve_backend("vllm", str(tiny_base))
    assert resolve_backend("auto", str(tiny_base)) == "transformers"
    assert "not under torchrun" in capsys.readouterr().out


def test_refused_backend_stops_before_anything_is_written(fake_vllm, tiny_base, files, monkeypatch):
    prompts, scorer, out = files
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="CUDA"):
        make_pairs(str(prompts), str(tiny_base), scorer, str(out), n=3, backend="vllm", device="cpu")
    assert not out.parent.exists() and not fake_vllm


def test_auto_without_cuda_records_transformers(fake_vllm, files, monkeypatch):
    import qsimpo.pairs.sample as sample

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sample, "load_policy", lambda *a, **k: (None, None, "fake"))
    monkeypatch.setattr(sample, "sample", lambda model, tok, prompts, ids, n, *a, **k: ([["a", "bb", "ccc"][:n]] * len(prompts),
                                                                                   0, 0))
    prompts, scorer, out = files
    make_pairs(str(prompts), "fake-model", scorer, str(out), n=3)
    assert json.loads(out.with_name("pairs.jsonl.settings.json").read_text())["settings"]["backend"] == "transformers"
    assert not fake_vllm


def test_a_file_from_before_backends_resumes_with_transformers(tmp_path):
    from qsimpo.pairs.write import PairsFile

    out = tmp_path / "pairs.jsonl"
    settings = {"model": "m", "n": 3}
    out.with_name("pairs.jsonl.settings.json").write_text(json.dumps(settings))
    PairsFile(out, {**settings, "backend": "transformers"})
    with pytest.raises(OutputExists, match=r"backend 'transformers' -> 'vllm'"):
        PairsFile(out, {**settings, "backend": "vllm"})


@pytest.mark.gpu
def test_vllm_answers_do_not_depend_on_the_batch(pref_rows, tmp_path):
    """The real vLLM on a tiny base (head size 64, which every vLLM attention kernel takes)."""
    pytest.importorskip("vllm")
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    texts = [r[k] for r in pref_rows for k in ("prompt", "chosen", "rejected")]
    tok = build_tokenizer(texts, vocab_size=320)
    base = save_base(build_model(tok, hidden_size=128, num_layers=2, num_heads=2, max_positions=512), tok, tmp_path / "b")
    assert resolve_backend("auto", str(base)) == "vllm"
    policy = load_vllm(str(base), seed=0)
    together, _, _ = policy([RAIN, OWLS], ["rain", "owls"], 4, 0.8, 0.95, 16, 1)
    alone, tokens, _ = policy([OWLS], ["owls"], 4, 0.8, 0.95, 16, 1)
    assert together[1] == alone[0] and tokens > 0
    other_seed, _, _ = policy([OWLS], ["owls"], 4, 0.8, 0.95, 16, 2)
    assert other_seed[0] != alone[0]
