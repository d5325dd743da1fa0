"""`qsimpo merge` on a tiny NF4 model with an adapter that is far from the identity.

The merged weights are checked against the arithmetic written out (W + α/r · B·A, with W either
bitsandbytes' own dequantization of the NF4 base or the original weights), the merged model's
logits against the unmerged adapter, and the verify step against a merge that is broken on purpose.
tests/test_real_model.py merges an adapter trained on SmolLM2 (tied embeddings, 30 layers), where a
bfloat16 merge loses the adapter and verify says so.
"""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_config
from qsimpo.cli import main as cli
from qsimpo.errors import InputNotFound, UsageError
from qsimpo.export.merge import DEFAULT_MAX_RATIO, MergeError, VerifyError, merge
from qsimpo.export.verify import NEGLIGIBLE_KL, Agreement, VerifyReport

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quiet(*_):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is faster


@pytest.fixture(scope="module")
def adapter(tiny_base, pref_jsonl, tmp_path_factory):
    """An adapter folder as `qsimpo train` writes it, with random lora_B (so B·A is far from 0)."""
    from qsimpo.train.model import add_lora, load_base
    from qsimpo.train.recipe import write_provenance

    out = tmp_path_factory.mktemp("adapter") / "run"
    cfg = make_config(tiny_base, pref_jsonl, out)
    model = add_lora(load_base(cfg.model, "cpu"), cfg.lora, True, False, seed=0)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.5
    model.save_pretrained(out)
    state = types.SimpleNamespace(state=types.SimpleNamespace(global_step=3, epoch=0.1))
    write_provenance(cfg, out, state, {"train": {"source": str(pref_jsonl), "rows_read": 64, "kept": 64}})
    (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 0.5, "rewards/accuracies": 0.75}) + "\n")
    return out


@pytest.fixture(scope="module")
def merged(adapter, tmp_path_factory):
    """The default merge (dequantized NF4 weights, float32: the arithmetic can be checked exactly), sharded."""
    out = tmp_path_factory.mktemp("merged") / "m"
    result = merge(str(adapter), out, max_shard_size="100KB", device="cpu", log=_quiet)
    return out, result


def _delta(adapter_dir, layer: int, name: str) -> torch.Tensor:
    lora = load_file(adapter_dir / "adapter_model.safetensors")
    group = "self_attn" if name in LINEARS[:4] else "mlp"
    prefix = f"base_model.model.model.layers.{layer}.{group}.{name}"
    scale = 8 / 4  # --lora.alpha 8 / --lora.r 4 (make_config)
    return scale * lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]


def _merged_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(shard))
    return weights


def test_dequantized_merge_is_nf4_weights_plus_lora(tiny_base, adapter, merged):
    import bitsandbytes as bnb

    from qsimpo.config import ModelConfig
    from qsimpo.train.model import load_base

    out, result = merged
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "qsimpo.json", "config.yaml"} <= files
    assert len([f for f in files if f.startswith("model-")]) > 1, "100KB shards: the tiny model must be split"
    assert not list(out.parent.glob(".*partial*")), "the staging folder must be gone"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    assert (out / "config.yaml").read_bytes() == (adapter / "config.yaml").read_bytes()  # the run's, as written

    # W_merged = dequant(NF4(W)) + α/r·B·A, layer by layer, against bitsandbytes' own dequantization
    nf4 = load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu")
    weights = _merged_weights(out)
    for layer in range(2):
        for name in LINEARS:
            group = "self_attn" if name in LINEARS[:4] else "mlp"
            q = getattr(getattr(nf4.model.layers[layer], group), name)
            w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
            delta = _delta(adapter, layer, name)
            assert delta.abs().max() > 0.1, "the adapter must not be the identity"
            torch.testing.assert_close(weights[f"model.layers.{layer}.{group}.{name}.weight"], w + delta, rtol=0, atol=1e-5)

    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["merged_from"] == str(adapter.resolve()) and meta["base_weights"] == "dequantized"
    assert meta["dtype"] == config["dtype"] == "float32"  # the default
    assert meta["final_metrics"]["train"]["loss"] == 0.5 and meta["verify"]["passed"] is True
    assert meta["verify"]["ratio"] == result.report.ratio and meta["verify"]["max_ratio"] == DEFAULT_MAX_RATIO
    report = result.report
    assert report.passed and report.probes.endswith("from the training data")
    assert report.dequantized.kl < 1e-6 and report.dequantized.top1 > 0.99  # same weights, fp32: the merge arithmetic only
    assert report.four_bit.kl < 1e-6 and report.ratio < 1e-4 and report.adapter_effect.kl > 0.01


def test_merged_logits_match_adapter_on_dequantized_base(tiny_base, adapter, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qsimpo.config import ModelConfig
    from qsimpo.train.model import dequantize_base, load_base

    out, _ = merged
    ids = torch.tensor([[1, 20, 31, 45, 60, 77, 91, 102]])
    reference = PeftModel.from_pretrained(dequantize_base(load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu"),
                                                          torch.float32), str(adapter)).eval()
    plain = load_base(ModelConfig(name_or_path=str(tiny_base), quantization="none", compute_dtype="float32"), "cpu").eval()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want, got, base_logits = reference(ids).logits, model(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - base_logits).abs().max() > 0.1, "the merge must have changed the model"


def test_original_merge_uses_unquantized_weights(tiny_base, adapter, merged, tmp_path):
    out = tmp_path / "orig"
    merge(str(adapter), out, base_weights="original", dtype="float32", verify=False, device="cpu", log=_quiet)
    base = load_file(tiny_base / "model.safetensors")
    weights = _merged_weights(out)
    dequantized = _merged_weights(merged[0])
    for layer in range(2):
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        torch.testing.assert_close(weights[key], base[key] + _delta(adapter, layer, "q_proj"), rtol=0, atol=1e-5)
        assert not torch.allclose(weights[key], dequantized[key]), "original and dequantized bases must differ (NF4 error)"
    assert json.loads((out / "qsimpo.json").read_text())["base_weights"] == "original"


def _broken_weight(monkeypatch):
    from qsimpo.export import merge as merge_mod

    real = merge_mod._merge_in_memory

    def corrupted(*args, **kwargs):
        model, ref = real(*args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(-20.0)
        return model, ref

    monkeypatch.setattr(merge_mod, "_merge_in_memory", corrupted)


def _lost_adapter(monkeypatch):
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kw: self.unload())  # drops the LoRA, merges nothing


@pytest.mark.parametrize("breakage", [_broken_weight, _lost_adapter], ids=["broken-weight", "lost-adapter"])
def test_bad_merge_fails_verify_and_writes_nothing(adapter, tmp_path, monkeypatch, breakage):
    breakage(monkeypatch)
    out = tmp_path / "bad"
    with pytest.raises(VerifyError, match=r"does not keep the adapter: mean KL .* to the unmerged adapter .* above "
                                          r"--max-ratio 0.1.*training log .*Nothing was written") as err:
        merge(str(adapter), out, device="cpu", log=_quiet)
    assert list(tmp_path.iterdir()) == [], "neither the output nor the staging folder may remain"
    report = err.value.report
    assert "4-bit base" in str(err.value) and not report.passed
    if breakage is _lost_adapter:  # merging nothing leaves the base: as far from the adapter as the adapter moves it
        assert 0.5 < report.ratio < 2


def _report(kl: float, effect: float, max_ratio: float = 0.1, max_kl: float = 0.01, four_bit: float | None = None):
    four = Agreement(kl if four_bit is None else four_bit, 0.97, 10)
    return VerifyReport(four, Agreement(kl, 0.98, 10), Agreement(effect, 0.5, 10), max_ratio, max_kl, "p")


def test_verify_verdict_is_a_ratio_to_the_adapters_effect():
    assert _report(4e-4, 4e-3).ratio == pytest.approx(0.1) and _report(3.9e-4, 4e-3).passed
    assert not _report(6.7e-3, 4.2e-3).passed  # bf16 on SmolLM2 after 6 steps: the merge moved more than the adapter
    assert _report(6e-3, 3.7).passed  # the same rounding next to an adapter that moves its base 600 times more
    assert not _report(1e-4, 3.7, four_bit=0.02).passed  # the 4-bit adapter is held to --max-kl
    assert _report(3e-8, 4e-3, four_bit=2e-3).passed  # a bf16-computed 4-bit reference beside an exact float32 merge
    assert _report(5e-4, 1e-3, max_ratio=0.5).passed and not _report(5e-4, 1e-3).passed
    assert _report(NEGLIGIBLE_KL, 0.0).passed and _report(0.0, 0.0).ratio == 0.0  # an adapter with nothing to keep
    assert _report(2e-6, 0.0).ratio == float("inf") and not _report(2e-6, 0.0).passed
    for bad in (float("nan"), float("inf")):
        assert not _report(bad, 1.0).passed and not _report(1e-4, 1.0, four_bit=bad).passed


def test_failure_message_says_what_to_do(tmp_path):
    from qsimpo.export.merge import _failure_message

    out = tmp_path / "m"
    bf16 = _failure_message(_report(6.7e-3, 4.2e-3), "dequantized", "bfloat16", out)
    assert bf16.startswith("the merged model does not keep the adapter: mean KL 0.0067 nats/token to the unmerged "
                           "adapter (top-1 agreement 98.0%) is 159.5% of the adapter's own effect (0.0042), above --max-ratio 0.1.")
    assert "merge with --dtype float32 (the default), or accept the loss with a larger --max-ratio" in bf16
    assert bf16.endswith(f"Nothing was written to {out}; --no-verify writes it without this check.")
    original = _failure_message(_report(1e-3, 4e-3), "original", "float32", out)
    assert "--base-weights dequantized (the default)" in original
    broken = _failure_message(_report(1e-4, 3.7, four_bit=0.5), "dequantized", "float32", out)
    assert "to the adapter on its 4-bit base (top-1 agreement 97.0%) is above --max-kl 0.01" in broken
    assert "to the unmerged adapter" not in broken and "training log (metrics.jsonl)" in broken


def test_nan_adapter_is_refused_by_safe_merge(adapter, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    lora = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in lora if "lora_B" in k)
    lora[key][0, 0] = float("nan")
    save_file(lora, broken / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="non-finite weights.*checkpoint"):
        merge(str(broken), tmp_path / "out", verify=False, device="cpu", log=_quiet)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial*"))


def test_refusals(adapter, merged, tmp_path, capsys):
    out, _ = merged
    with pytest.raises(MergeError, match="already holds a merged model.*--overwrite"):
        merge(str(adapter), out, device="cpu", log=_quiet)  # merging twice into the same folder
    with pytest.raises(InputNotFound, match="holds no adapter_config.json .it holds a merged model"):
        merge(str(out), tmp_path / "again", device="cpu", log=_quiet)  # merging a merge
    with pytest.raises(MergeError, match="would overwrite the adapter"):
        merge(str(adapter), adapter / "merged", device="cpu", log=_quiet)
    with pytest.raises(MergeError, match="--base-weights 'nf4' must be one of dequantized, original"):
        merge(str(adapter), tmp_path / "x", base_weights="nf4", log=_quiet)
    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    (no_meta / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match="records no base model.*--base"):
        merge(str(no_meta), tmp_path / "y", log=_quiet)

    assert cli(["merge", str(adapter), "--out", str(out)]) == 2  # a refusal: the CLI prints the reason, exit 2
    assert "already holds a merged model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_dequantize_refuses_weights_repacked_for_cpu(tiny_base):
    from qsimpo.config import ModelConfig
    from qsimpo.train.model import dequantize_base, load_base

    model = load_base(ModelConfig(name_or_path=str(tiny_base)), "cpu").eval()
    import bitsandbytes as bnb

    for m in model.modules():  # undo load_base's keep_training_layout: a base loaded some other way
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))  # an inference forward: bitsandbytes may repack the 4-bit weights in place
    if not getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes did not repack")
    with pytest.raises(RuntimeError, match="repacked for the CPU.*freshly loaded"):
        dequantize_base(model, torch.float32)


def test_dequantize_int8_base(tiny_base):
    from qsimpo.config import ModelConfig
    from qsimpo.train.model import dequantize_base, load_base

    model = dequantize_base(load_base(ModelConfig(name_or_path=str(tiny_base), quantization="int8"), "cpu"), torch.float32)
    original = load_file(tiny_base / "model.safetensors")
    assert "quantization_config" not in model.config.to_dict()
    for name, w in original.items():
        if "layers" in name and name.endswith("proj.weight"):
            got = model.get_parameter(name)
            assert type(got) is torch.nn.Parameter and got.dtype == torch.float32
            # LLM.int8 rounds each row to steps of 1/127 of its largest entry: error <= step/2, plus the
            # fp16 rounding of the copy bitsandbytes quantizes (measured: at most 0.534 steps here)
            step = w.abs().amax(dim=1, keepdim=True) / 127
            assert ((got - w).abs() <= 0.6 * step).all(), name


def test_merge_from_a_hub_id(adapter, merged, tmp_path, monkeypatch):
    """A Hub id works like a folder: the adapter is served from a Hub cache, offline."""
    import shutil

    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--someone--tiny-simpo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "qsimpo.json"):  # what `qsimpo push` uploads
        shutil.copy2(adapter / name, snapshot / name)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    result = merge("someone/tiny-simpo", tmp_path / "out", dtype="float32", device="cpu", log=_quiet)
    assert result.report.passed and "built-in prompts" in result.report.probes  # no training data beside a Hub adapter
    meta = json.loads((tmp_path / "out" / "qsimpo.json").read_text())
    assert meta["merged_from"] == "someone/tiny-simpo"
    from_hub, from_folder = _merged_weights(tmp_path / "out"), _merged_weights(merged[0])
    assert from_hub.keys() == from_folder.keys() and all(torch.equal(from_hub[k], from_folder[k]) for k in from_hub)


@pytest.mark.gpu
def test_merge_on_cuda_against_4bit_adapter(adapter, tmp_path):
    out = tmp_path / "cuda"
    result = merge(str(adapter), out, dtype="bfloat16", device="cuda:0", log=_quiet)
    assert result.report.passed
    assert result.report.four_bit.top1 > 0.9 and result.report.dequantized.kl < 1e-3
