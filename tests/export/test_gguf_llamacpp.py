"""qsimpo's GGUF files loaded and run by llama.cpp itself (npm's node-llama-cpp, prebuilt), on the tiny model.

llama.cpp's greedy answers, token id by token id, must be transformers' on the same weights: the merged F16
file against transformers reading that file, and the base F16 file with the adapter GGUF applied (``--lora``)
against transformers reading the base file plus the updates the adapter file holds. The prompts must tokenize
to the same ids through the chat template stored in the file. Skipped where node and node-llama-cpp are not
installed (benchmarks/bench_gguf_llamacpp.py says how); the benchmark does the same on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import ROOT, make_adapter
from tiny_archs import KINDS, tiny_base_of

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_gguf_llamacpp import INSTALL, find_node_modules, llama_cpp  # noqa: E402

PROMPTS = ["Tell me about owls.", "What is the capital of France?", "Explain how a bicycle works."]
TOKENS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def node_modules():
    found = find_node_modules()
    if found is None:
        pytest.skip(f"needs node and node-llama-cpp's prebuilt llama.cpp: {INSTALL}")
    return found


@pytest.fixture(scope="module")
def files(node_modules, tiny_base, tmp_path_factory):
    """(merged folder, base F16 file, adapter GGUF) from `merge --gguf f16 --gguf lora` and the tiny base."""
    from transformers import AutoConfig, AutoTokenizer

    from qsimpo.export.gguf_out import plan, write
    from qsimpo.export.merge import merge

    root = tmp_path_factory.mktemp("llamacpp")
    adapter = make_adapter(tiny_base, root / "adapter", seed=2)
    merged = root / "tiny"
    merge(str(adapter), merged, device="cpu", log=lambda *_: None, gguf=["f16", "lora"])
    pl = plan(AutoConfig.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base), ["f16"])
    (root / "base").mkdir()
    base = write(tiny_base, root / "base" / "base-F16.gguf", "f16", pl, "base")
    return merged, base, merged / "gguf" / "tiny-LoRA-F32.gguf"


def _greedy(model, tokenizer) -> list[tuple[list[int], list[int]]]:
    from qsimpo.generate import generate, prompt_ids

    out = []
    for prompt in PROMPTS:
        ids = prompt_ids(tokenizer, prompt)
        out.append((ids, generate(model, tokenizer, [ids], TOKENS)[0].ids))  # the stop token left out, as llama.cpp does
    return out


def _from_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name)
    return (AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs).eval(),
            AutoTokenizer.from_pretrained(str(path.parent), **kwargs))


def _same(got: dict, want: list) -> None:
    assert got["llama_cpp"]["repo"] == "ggml-org/llama.cpp" and got["build"] == "prebuilt"
    for answer, (ids, new) in zip(got["answers"], want, strict=True):
        assert answer["prompt_ids"] == ids, f"{answer['prompt']!r}: llama.cpp tokenized the chat prompt differently"
        assert answer["answer_ids"] == new, f"{answer['prompt']!r}: llama.cpp answered {answer['answer']!r}"
        assert len(new) >= 4, "an answer must have tokens to compare"


def test_llama_cpp_runs_the_merged_file_as_transformers_does(files, node_modules, tmp_path):
    merged, _, _ = files
    path = merged / "gguf" / "tiny-F16.gguf"
    _same(llama_cpp(node_modules, path, PROMPTS, TOKENS, 1, work=tmp_path), _greedy(*_from_gguf(path)))


def test_llama_cpp_applies_the_adapter_gguf_to_the_base_file(files, node_modules, tmp_path):
    from qsimpo.export.gguf_lora import updates

    _, base, lora = files
    model, tokenizer = _from_gguf(base)
    plain = _greedy(model, tokenizer)
    with torch.no_grad():  # what llama.cpp computes with --lora: each adapted weight plus the file's s·B·A
        weights = model.state_dict()
        for name, delta in updates(lora, model.config).items():
            weights[name].add_(torch.from_numpy(delta).float())
    with_lora = llama_cpp(node_modules, base, PROMPTS, TOKENS, 1, lora=lora, work=tmp_path)
    _same(with_lora, _greedy(model, tokenizer))
    without = llama_cpp(node_modules, base, PROMPTS, TOKENS, 1, work=tmp_path)
    _same(without, plain)
    assert [a["answer_ids"] for a in with_lora["answers"]] != [a["answer_ids"] for a in without["answers"]], \
        "the adapter must change llama.cpp's answers"


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_runs_other_architectures_as_transformers_does(kind, node_modules, tmp_path):
    """Mistral (as llama.cpp's "llama"), Gemma 2 and Gemma 3 with their sentencepiece-style vocabulary: the chat
    prompts (20+ tokens, past Gemma's sliding window of 8) tokenize to the same ids and answer the same."""
    from transformers import AutoConfig, AutoTokenizer

    from qsimpo.export.gguf_out import plan, write

    base = tiny_base_of(kind, tmp_path / "base")
    pl = plan(AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base), ["f16"])
    (tmp_path / "gguf").mkdir()
    path = write(base, tmp_path / "gguf" / f"tiny-{kind}-F16.gguf", "f16", pl, f"tiny-{kind}")
    want = _greedy(*_from_gguf(path))
    assert all(len(ids) > 20 for ids, _ in want)
    _same(llama_cpp(node_modules, path, PROMPTS, TOKENS, 1, work=tmp_path), want)


def test_llama_cpp_applies_llama31_rope_scaling_as_transformers_does(node_modules, tmp_path):
    """Llama 3.1's rope scaling goes into the file as llama.cpp's rope_freqs tensor: llama.cpp's greedy answers
    equal those of the original transformers model (not a read-back), which differ without the scaling."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qsimpo.export.gguf_out import plan, write

    base = tiny_base_of("llama31", tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    pl = plan(AutoConfig.from_pretrained(base), tokenizer, ["f16"])
    (tmp_path / "gguf").mkdir()
    path = write(base, tmp_path / "gguf" / "tiny-llama31-F16.gguf", "f16", pl, "tiny-llama31")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    want = _greedy(model, tokenizer)
    unscaled = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0}).eval()
    assert [new for _, new in _greedy(unscaled, tokenizer)] != [new for _, new in want], "the scaling must matter"
    _same(llama_cpp(node_modules, path, PROMPTS, TOKENS, 1, work=tmp_path), want)
