"""`qsimpo merge --gguf` on tiny Mistral, Gemma 2 and Gemma 3 models with a sentencepiece-style tokenizer.

The vocabulary (tokenizer.ggml.model "llama": scores, BYTE tokens, add_space_prefix) round-trips through
transformers' GGUF tokenizer to the same ids on text with spaces, digits and characters only byte fallback
spells; each merged file is read back by transformers and checked (KL, top-1, chat template, greedy answer);
the adapter GGUF holds the adapter under llama.cpp's names. tests/export/test_gguf_llamacpp.py runs the same
files in llama.cpp itself.
"""

from __future__ import annotations

import json

import pytest

from conftest import make_adapter
from qsimpo.export.gguf_out import GGUFError, plan, write
from qsimpo.export.merge import merge
from tiny_archs import KINDS, spm_tokenizer, tiny_base_of

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["Tell me about owls.", "  Two leading spaces, 12345 and 3.14!", "ünïcode ☃ 北京 needs byte fallback",
         "Hello\n\nworld\tx  y", "The capital of France is Paris."]
ARCH = {"mistral": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3"}


@pytest.fixture(scope="module", params=KINDS)
def merged(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    out = root / f"tiny-{kind}"
    base = tiny_base_of(kind, root / "base")
    adapter = make_adapter(base, root / "adapter", seed=2)
    types = ["f16", "q8_0", "lora"] if kind == "mistral" else ["f16", "lora"]
    merge(str(adapter), out, device="cpu", log=_quiet, gguf=types)
    return kind, out


def _quiet(*_):
    pass


def test_merged_files_answer_like_the_merged_model(merged):
    from gguf import GGUFReader

    kind, out = merged
    files = sorted(p.name for p in (out / "gguf").glob("*.gguf"))
    types = ["F16", "Q8_0"] if kind == "mistral" else ["F16"]
    assert files == sorted([f"{out.name}-{t}.gguf" for t in types] + [f"{out.name}-LoRA-F32.gguf"])
    for t in types:
        record = json.loads((out / "gguf" / f"{out.name}-{t}.json").read_text())
        check = record["check"]
        assert check["passed"] and check["tokens_equal"] and check["chat_template_equal"] and check["greedy_match"]
        assert record["architecture"] == ARCH[kind] and record["tokenizer_pre"] == "sentencepiece"
    reader = GGUFReader(out / "gguf" / f"{out.name}-F16.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
              or k.split(".")[-1] not in ("tokens", "merges", "token_type", "scores")}
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in fields
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is False
    types_ = reader.fields["tokenizer.ggml.token_type"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert sum(t == 6 for t in types_) == 256 and tokens[types_.index(6)] == "<0x00>"  # BYTE
    names = {t.name for t in reader.tensors}
    if kind == "mistral":
        assert fields["llama.block_count"] == 2 and "output.weight" in names
    else:
        arch = ARCH[kind]
        assert fields[f"{arch}.attention.sliding_window"] == 8 and fields[f"{arch}.attention.key_length"] == 256
        assert "output.weight" not in names and "blk.0.post_ffw_norm.weight" in names  # tied; Gemma's four norms
        norm = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        assert abs(float(norm.data.mean()) - 1.0) < 0.5  # stored as 1 + w (w drawn around 0)
        if kind == "gemma2":
            assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
        else:
            assert "blk.0.attn_q_norm.weight" in names and fields["gemma3.rope.freq_base"] == 1e6
    lora = json.loads((out / "gguf" / f"{out.name}-LoRA-F32.json").read_text())
    assert lora["check"]["passed"] and lora["architecture"] == ARCH[kind]


@pytest.mark.parametrize("gemma", [False, True])
def test_sentencepiece_vocabulary_round_trips_through_transformers(gemma, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    base = tiny_base_of("gemma3_text" if gemma else "mistral", tmp_path)
    tok = AutoTokenizer.from_pretrained(base)
    pl = plan(AutoConfig.from_pretrained(base), tok, ["f16"])
    assert pl.pre == "sentencepiece"
    path = write(base, tmp_path / "v.gguf", "f16", pl, "v")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert back(text).input_ids == tok(text).input_ids, text
        assert back.decode(back(text).input_ids, skip_special_tokens=True) == tok.decode(tok(text).input_ids,
                                                                                        skip_special_tokens=True)
    chat = [{"role": "user", "content": TEXTS[1]}]
    assert back.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(
        chat, add_generation_prompt=True)


def test_unsupported_settings_are_refused(tmp_path):
    from transformers import Gemma2Config, Gemma3Config, Gemma3TextConfig

    tok = spm_tokenizer(True)
    with pytest.raises(GGUFError, match="query_pre_attn_scalar 144"):
        plan(Gemma2Config(query_pre_attn_scalar=144), tok, ["f16"])
    with pytest.raises(GGUFError, match="layer_types"):
        plan(Gemma2Config(num_hidden_layers=2, layer_types=["full_attention"] * 2), tok, ["f16"])
    with pytest.raises(GGUFError, match="soft-capping"):
        plan(Gemma3TextConfig(final_logit_softcapping=30.0), tok, ["f16"])
    with pytest.raises(GGUFError, match="gemma3 models is not supported yet"):
        plan(Gemma3Config(), tok, ["f16"])
