"""4-bit inference on the CPU: eval, the demo's generation and merge on a model whose MLP width (1376)
is not a multiple of the 64-wide quantization block, which bitsandbytes' CPU inference repack cannot handle."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from qsimpo.cli import main
from qsimpo.config import ModelConfig
from qsimpo.train.model import load_base
from conftest import USER, make_adapter


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory, pref_rows):
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    tok = build_tokenizer([r[k] for r in pref_rows for k in ("prompt", "chosen", "rejected")], vocab_size=320)
    model = build_model(tok, hidden_size=64, intermediate_size=1376, num_layers=2, max_positions=512)
    return save_base(model, tok, tmp_path_factory.mktemp("wide") / "base")


@pytest.fixture(scope="module")
def wide_adapter(wide_base, tmp_path_factory):
    return make_adapter(wide_base, tmp_path_factory.mktemp("wide-adapter") / "adapter", seed=3)


def _repacked(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]


def test_eval_forward_is_the_training_forward(wide_base):
    model = load_base(ModelConfig(name_or_path=str(wide_base)), "cpu")
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    with torch.no_grad():
        trained_path = model.train()(ids).logits  # train mode: bitsandbytes dequantizes and multiplies
        inference = model.eval()(ids).logits  # eval mode, no grad: where bitsandbytes would repack for the CPU
    assert not _repacked(model)
    assert torch.equal(inference, trained_path)


def test_eval_generate_and_merge_on_cpu(wide_base, wide_adapter, pref_jsonl, tmp_path):
    out = tmp_path / "eval"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["eval", str(wide_adapter), "--data", str(pref_jsonl), "--max-rows", "8", "--generate", "1",
                   "--max-new-tokens", "6", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["models"]["aligned"]["n"] == 8

    from qsimpo.demo.sides import Settings, SideBySide

    chat = SideBySide.load(str(wide_adapter), device="cpu")
    assert isinstance(chat.respond("right", USER, Settings(temperature=0, max_new_tokens=6)), str)
    assert not _repacked(chat.model)

    from qsimpo.export.merge import merge

    merged = merge(str(wide_adapter), tmp_path / "merged", dtype="float32", n_probes=2, device="cpu", log=lambda *a: None)
    assert (tmp_path / "merged" / "config.json").exists() and merged.report.passed


def test_training_with_in_run_eval(wide_base, pref_jsonl, tmp_path):
    """The Trainer's evaluation runs in eval mode without grad too: training continues on the same layers after it."""
    from conftest import make_config
    from qsimpo.train.recipe import train

    cfg = make_config(wide_base, pref_jsonl, tmp_path / "run", "--train.max_steps", "2", "--data.eval", "'0.25'",
                      "--train.eval_every", "1")
    run = train(cfg)
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_loss" in r] == [1, 2]
    assert not _repacked(run.trainer.model)


def test_the_recorded_revision_goes_with_the_recorded_base_only(tmp_path, monkeypatch):
    """An adapter trained on base@commit: its commit (and GGUF file) are asked of that base, never of another --base."""
    import json

    import qsimpo.train.model as m

    (tmp_path / "qsimpo.json").write_text(json.dumps({"base_model": "org/base", "base_model_revision": "abc123",
                                                      "base_model_gguf_file": "m.gguf", "quantization": "nf4"}))
    seen = []
    monkeypatch.setattr(m, "load_tokenizer", lambda cfg: seen.append(cfg) or (_ for _ in ()).throw(RuntimeError("stop")))
    for base in (None, "other/base"):
        with contextlib.suppress(RuntimeError):
            m.load_trained(str(tmp_path), base)
    assert (seen[0].name_or_path, seen[0].revision, seen[0].gguf_file) == ("org/base", "abc123", "m.gguf")
    assert (seen[1].name_or_path, seen[1].revision, seen[1].gguf_file) == ("other/base", None, None)
