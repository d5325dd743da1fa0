"""`qsimpo merge --gguf`: a merged tiny Llama written as GGUF, read back by transformers and checked.

The file's metadata and tensor types are read with gguf-py's reader; the check is shown to fail on a
file written without llama.cpp's Q/K permutation; unsupported architectures, tokenizers and types are
refused before anything is written. tests/test_real_model.py does the same on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch

from conftest import make_adapter
from qsimpo.cli import main as cli
from qsimpo.export.gguf_check import LIMITS, check, held_out_probes
from qsimpo.export.gguf_out import GGUFError, Plan, ollama_template, plan, write
from qsimpo.export.merge import merge


def _quiet(*_):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


@pytest.fixture(scope="module")
def merged_gguf(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    adapter = make_adapter(tiny_base, root / "adapter", seed=2)  # a random tiny model has near-tied logits: with seed 2 its
    # greedy answer is far enough from a tie that Q8_0 rounding keeps it (seeds 1 and 3 flip a token; real models: 95% top-1)
    out = root / "tiny-merged"
    merge(str(adapter), out, device="cpu", log=_quiet, gguf=["f16", "q8_0"])
    return out


def test_merge_writes_gguf_files_that_answer_like_the_merged_model(merged_gguf):
    from gguf import GGUFReader

    files = sorted(p.name for p in (merged_gguf / "gguf").iterdir())
    assert files == ["tiny-merged-F16.Modelfile", "tiny-merged-F16.gguf", "tiny-merged-F16.json",
                     "tiny-merged-Q8_0.Modelfile", "tiny-merged-Q8_0.gguf", "tiny-merged-Q8_0.json"]
    meta = json.loads((merged_gguf / "qsimpo.json").read_text())
    assert meta["gguf"] == ["tiny-merged-F16.gguf", "tiny-merged-Q8_0.gguf"]
    for kind, weight_type in (("F16", "F16"), ("Q8_0", "Q8_0")):
        record = json.loads((merged_gguf / "gguf" / f"tiny-merged-{kind}.json").read_text())
        checked = record["check"]
        assert checked["passed"] and not checked["problems"]
        assert checked["kl"] <= LIMITS[kind.lower()][0] and checked["top1"] >= LIMITS[kind.lower()][1]
        assert checked["chat_template_equal"] and checked["tokens_equal"] and checked["greedy_match"]
        assert checked["greedy_gguf"], "the greedy answer must not be empty"
        path = merged_gguf / "gguf" / record["gguf_file"]
        assert record["bytes"] == path.stat().st_size and record["type"] == kind

        reader = GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") or
                  k.split(".")[-1] not in ("tokens", "merges", "token_type")}
        assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
        assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
        assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)  # <s>, </s>
        assert fields["tokenizer.ggml.add_bos_token"] is True  # the tiny tokenizer adds BOS itself
        assert fields["tokenizer.chat_template"].startswith("{{ bos_token }}")
        assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
        assert types["blk.1.attn_q.weight"] == weight_type and types["output.weight"] == weight_type
        assert len(types) == 2 + 1 + 2 * 9  # embedding, output head, final norm; 9 tensors a layer

    modelfile = (merged_gguf / "gguf" / "tiny-merged-Q8_0.Modelfile").read_text()
    assert "FROM ./tiny-merged-Q8_0.gguf\n" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "{{ .Prompt }}" in modelfile and "PARAMETER temperature 0" in modelfile


def test_check_fails_on_a_file_without_the_qk_permutation(merged_gguf, tmp_path):
    """llama.cpp's Llama attention reads Q and K rows interleaved; written as transformers stores them, the file
    loads but answers differently, and the check says so (transformers' reader undoes the permutation)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_gguf)
    model = AutoModelForCausalLM.from_pretrained(merged_gguf, dtype=torch.float32).eval()
    pl = plan(AutoConfig.from_pretrained(merged_gguf), tokenizer, ["f16"])
    assert pl.permute_qk
    path = write(merged_gguf, tmp_path / "wrong.gguf", "f16", Plan(pl.arch, False, pl.pre, pl.types))
    probes, source = held_out_probes(model, tokenizer, n=3)
    report = check(path, "f16", model, tokenizer, probes, source)
    # the tiny random model's next-token distributions are flat, so its KL stays small; its top-1 choices move
    assert not report.passed and report.top1 < LIMITS["f16"][1]
    assert report.chat_template_equal and report.tokens_equal  # only the weights are wrong


def test_unsupported_architecture_tokenizer_and_type_are_refused(tiny_base):
    from transformers import AutoTokenizer, Gemma3Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    with pytest.raises(GGUFError, match="gemma3 models is not supported yet"):
        plan(Gemma3Config(), tokenizer, ["f16"])  # the multimodal one; Gemma3ForCausalLM (gemma3_text) is written
    with pytest.raises(GGUFError, match="'linear' rope scaling is not supported yet"):  # Llama 3.1's llama3 is written
        plan(LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), tokenizer, ["f16"])
    with pytest.raises(GGUFError, match="q5_k: not a type qsimpo writes"):
        plan(LlamaConfig(), tokenizer, ["q5_k"])

    from tokenizers import pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(GGUFError, match="not one llama.cpp knows by name"):
        plan(LlamaConfig(), tokenizer, ["f16"])


def test_cli_refuses_an_unknown_type_before_merging(tiny_base, tmp_path):
    adapter = make_adapter(tiny_base, tmp_path / "adapter", seed=4)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(["merge", str(adapter), "--out", str(tmp_path / "m"), "--gguf", "q5_k"])
    assert code == 2 and "invalid choice: 'q5_k'" in err.getvalue()
    assert not (tmp_path / "m").exists()


def test_ollama_template_renders_like_the_chat_template(tiny_base):
    """The Go template, filled in the way Ollama fills it, gives the Jinja template's text for new messages."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    template = ollama_template(tokenizer)
    assert template is not None

    def go(system: str, prompt: str) -> str:  # the subset of Go templates ollama_template writes
        text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}",
                      lambda m: m.group(1) if system else m.group(2), template, flags=re.S)
        return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt).split("{{ .Response }}")[0]

    for system in ("", "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi owl"}]
        jinja = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.bos_token + go(system, "Hi owl") == jinja  # llama.cpp adds the BOS (add_bos_token)
