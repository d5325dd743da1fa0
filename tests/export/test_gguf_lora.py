"""`qsimpo merge --gguf lora`: the adapter alone as a llama.cpp LoRA GGUF, read back with gguf-py's reader.

For every adapted weight the file's pair, scaled as llama.cpp scales it (adapter.lora.alpha / rank, the rank
read from lora_b), is added to the base weight and compared with the merged model's weight; the metadata and
ggml shapes are the ones llama.cpp's loader validates. Adapters llama.cpp cannot run are refused before
anything is written. benchmarks/bench_gguf_llamacpp.py applies such a file in llama.cpp itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from qsimpo.cli import main as cli
from qsimpo.export.gguf_lora import check_lora, lora_plan, read_lora, write_lora
from qsimpo.export.gguf_out import GGUFError, llama_rows, tensor_names
from qsimpo.export.merge import merge

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster

PARTS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def lora_merge(tiny_base, tmp_path_factory):
    """An adapter merged into the original base weights, with --gguf lora: (adapter, merged folder)."""
    root = tmp_path_factory.mktemp("gguf-lora")
    adapter = make_adapter(tiny_base, root / "adapter", seed=5)
    out = root / "tiny-merged"
    merge(str(adapter), out, base_weights="original", verify=False, device="cpu", log=_quiet, gguf=["lora"])
    return adapter, out


def _config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _reconstructed(pairs: dict, alpha: float, base: dict, config, unpermute: bool = True) -> dict:
    """{transformers weight name: base weight + (alpha / rank) · B·A}, from the file's pairs as llama.cpp adds them."""
    hf_name = {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
               for i in range(config.num_hidden_layers) for g, h in PARTS.items()}
    out = {}
    for gname, (a, b) in pairs.items():
        hf = hf_name[gname]
        b = llama_rows(hf, np.asarray(b, dtype=np.float64), config, True, inverse=True) if unpermute else b
        delta = alpha / b.shape[1] * (b @ np.asarray(a, dtype=np.float64))
        out[hf] = base[hf].double().numpy() + delta
    return out


def test_adapter_gguf_plus_the_base_is_the_merged_model(lora_merge, tiny_base):
    from gguf import GGUFReader

    adapter, out = lora_merge
    path = out / "gguf" / "tiny-merged-LoRA-F32.gguf"
    assert sorted(p.name for p in (out / "gguf").iterdir()) == ["tiny-merged-LoRA-F32.gguf", "tiny-merged-LoRA-F32.json"]
    assert json.loads((out / "qsimpo.json").read_text())["gguf_lora"] == path.name
    record = json.loads((out / "gguf" / "tiny-merged-LoRA-F32.json").read_text())
    assert record["check"]["passed"] and record["bytes"] == path.stat().st_size and record["ranks"] == [4]

    meta, pairs = read_lora(path)
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0  # lora_alpha as trained
    assert meta["general.base_model.0.name"] == tiny_base.name  # a local base by its name, not this machine's path
    assert not any(k.startswith(("llama.", "tokenizer.")) for k in meta), "an adapter carries no hyperparameters or vocab"
    assert set(pairs) == {f"blk.{i}.{g}.weight" for i in range(2) for g in PARTS}

    config = _config(tiny_base)
    for t in GGUFReader(path).tensors:  # ggml order (ne): lora_a [in, rank], lora_b [rank, out], as llama.cpp checks
        hf = f"model.layers.{t.name.split('.')[1]}.{PARTS[t.name.split('.')[2]]}.weight"
        out_features, in_features = load_file(tiny_base / "model.safetensors")[hf].shape
        want = (in_features, 4) if t.name.endswith(".lora_a") else (4, out_features)
        assert tuple(int(n) for n in t.shape) == want and t.tensor_type.name == "F32", t.name

    base = load_file(tiny_base / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    rebuilt = _reconstructed(pairs, meta["adapter.lora.alpha"], base, config)
    assert len(rebuilt) == 14
    for hf, w in rebuilt.items():
        assert not np.allclose(base[hf].numpy(), merged[hf].numpy(), atol=1e-3), f"the adapter must change {hf}"
        np.testing.assert_allclose(w, merged[hf].double().numpy(), rtol=0, atol=2e-6, err_msg=hf)

    # Q and K go in llama.cpp's interleaved row order: read as transformers' order, they are not the merge
    wrong = _reconstructed(pairs, meta["adapter.lora.alpha"], base, config, unpermute=False)
    for hf in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert not np.allclose(wrong[hf], merged[hf].double().numpy(), atol=1e-3), hf
    np.testing.assert_allclose(wrong["model.layers.0.self_attn.v_proj.weight"],
                               merged["model.layers.0.self_attn.v_proj.weight"].double().numpy(), atol=2e-6)


def test_rslora_is_written_as_an_alpha_llama_cpp_scales_the_same(tiny_base, tmp_path):
    """rsLoRA scales by alpha / sqrt(r); llama.cpp by alpha / r: alpha · sqrt(r) in the file gives peft's merge."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "rs")
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "rs").merge_and_unload()

    config = _config(tiny_base)
    lp = lora_plan(str(tmp_path / "rs"), config)
    assert lp.rslora and lp.alpha == pytest.approx(8 * 4)  # alpha · sqrt(16)
    path = write_lora(str(tmp_path / "rs"), tmp_path / "rs.gguf", lp, config, "rs")
    assert check_lora(path, str(tmp_path / "rs"), lp, config)["passed"]
    meta, pairs = read_lora(path)
    assert set(pairs) == {f"blk.{i}.{g}.weight" for i in range(2) for g in ("attn_q", "ffn_down")}
    rebuilt = _reconstructed(pairs, meta["adapter.lora.alpha"], load_file(tiny_base / "model.safetensors"), config)
    state = merged.state_dict()
    for hf, w in rebuilt.items():
        np.testing.assert_allclose(w, state[hf].double().numpy(), rtol=0, atol=2e-6, err_msg=hf)


def test_check_fails_on_a_file_without_the_qk_permutation(lora_merge, tiny_base, tmp_path, monkeypatch):
    """The read-back check compares with the adapter itself, so a writer that skipped llama.cpp's row order fails it."""
    import qsimpo.export.gguf_lora as gguf_lora

    adapter, _ = lora_merge
    config = _config(tiny_base)
    lp = lora_plan(str(adapter), config)
    monkeypatch.setattr(gguf_lora, "llama_rows", lambda key, rows, *a, inverse=False, **k:
                        llama_rows(key, rows, *a, inverse=inverse, **k) if inverse else rows)
    path = write_lora(str(adapter), tmp_path / "wrong.gguf", lp, config, "wrong")
    report = check_lora(path, str(adapter), lp, config)
    assert not report["passed"] and "differs from the adapter's" in report["problems"][0]


def _edited(adapter, folder, config_changes=None, weights=None):
    """A copy of ``adapter`` with adapter_config.json keys changed and/or its weights replaced."""
    shutil.copytree(adapter, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(config_changes or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if weights is not None:
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "adapter_model.safetensors")
    return str(folder)


def test_adapters_llama_cpp_cannot_run_are_refused(lora_merge, tiny_base, tmp_path):
    from transformers import Gemma3Config

    adapter, _ = lora_merge
    config = _config(tiny_base)
    state = load_file(adapter / "adapter_model.safetensors")
    cases = [
        ({"use_dora": True}, None, "use_dora = True: llama.cpp's --lora cannot apply this adapter"),
        ({"modules_to_save": ["lm_head"]}, None, "modules_to_save = \\['lm_head'\\]"),
        ({"bias": "all"}, None, "bias = 'all' trains base biases"),
        ({"peft_type": "IA3"}, None, "peft_type 'IA3' is not LoRA"),
        ({"alpha_pattern": {"q_proj": 32}}, None, "alpha_pattern gives .*q_proj.weight the scale of alpha 32"),
        ({"use_rslora": True, "rank_pattern": {"q_proj": 2}},
         {k: (v[:2] if "q_proj.lora_A" in k else v[:, :2] if "q_proj.lora_B" in k else v) for k, v in state.items()},
         "rsLoRA \\(alpha / sqrt\\(r\\)\\) with ranks that differ"),
        (None, {**state, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 320)},
         "lora_embedding_A is LoRA on an embedding"),
        (None, {k: v[:, :32] if k.endswith("layers.0.mlp.gate_proj.lora_A.weight") else v for k, v in state.items()},
         "gate_proj is 128×32 in the adapter but 128×64 in the base: the adapter was not trained on this base"),
    ]
    for i, (changes, weights, message) in enumerate(cases):
        with pytest.raises(GGUFError, match=message):
            lora_plan(_edited(adapter, tmp_path / f"case{i}", changes, weights), config)
    with pytest.raises(GGUFError, match="adapter GGUF for 'gemma3' models is not supported"):  # multimodal
        lora_plan(str(adapter), Gemma3Config())
    tied = config.__class__(**{**config.to_dict(), "tie_word_embeddings": True})
    with_head = {**state, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                 "base_model.model.lm_head.lora_B.weight": torch.zeros(320, 4)}
    with pytest.raises(GGUFError, match="trains lm_head, which this base ties to its embedding"):
        lora_plan(_edited(adapter, tmp_path / "head", None, with_head), tied)


def test_cli_refuses_a_dora_adapter_before_merging(lora_merge, tmp_path):
    dora = _edited(lora_merge[0], tmp_path / "dora", {"use_dora": True})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(["merge", dora, "--out", str(tmp_path / "m"), "--gguf", "lora", "--gguf", "f16"])
    assert code == 2 and "DoRA rescales each column" in err.getvalue() and "--gguf f16" in err.getvalue()
    assert not (tmp_path / "m").exists()


def test_the_adapter_shares_the_merged_files_tensor_names(tiny_base):
    """One mapping: the names the adapter's pairs get are the merged GGUF's for the same weights."""
    config = _config(tiny_base)
    name = tensor_names(config, "llama")
    assert name("model.layers.1.self_attn.o_proj.weight") == "blk.1.attn_output.weight"
    assert name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert name("model.embed_tokens.weight") == "token_embd.weight" and name("model.nonsense.weight") is None
