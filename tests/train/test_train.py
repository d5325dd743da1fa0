"""End-to-end `qsimpo train` on a tiny NF4 model (real bitsandbytes 4-bit layers on the CPU)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import HH_SAMPLE, ROOT, free_port, make_config
from qsimpo.run_dir import CHECKPOINT_MARKER
from qsimpo.errors import InputNotFound, OutputExists
from qsimpo.train.recipe import resolve_resume, resume_command, train
from qsimpo.train.trainer import NonFiniteError

REQUIRED = {"adapter_config.json", "adapter_model.safetensors", "config.yaml", "qsimpo.json", "metrics.jsonl"}
METRIC_KEYS = {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "grad_norm", "learning_rate"}


def _initial_adapter(cfg):
    """The adapter weights a run starts from (same seed → same LoRA init), keyed like the saved file."""
    from peft import get_peft_model_state_dict

    from qsimpo.train.model import add_lora, load_base

    model = add_lora(load_base(cfg.model, "cpu"), cfg.lora, True, False, cfg.train.seed)
    return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}


def _base_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_smoke_three_steps(tiny_base, pref_jsonl, tmp_path):
    cfg = make_config(tiny_base, pref_jsonl, tmp_path / "run", "--train.max_steps", "3", "--train.save_steps", "2")
    init = _initial_adapter(cfg)
    from qsimpo.train.model import load_base

    base_before = _base_state(load_base(cfg.model, "cpu"))
    run = train(cfg)
    out = run.output_dir

    files = {p.name for p in out.iterdir()}
    assert REQUIRED <= files
    assert {"checkpoint-2", "checkpoint-3"} <= files
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == init.keys() and len(trained) == 2 * 7 * 2  # A and B of 7 linears × 2 layers
    unchanged = [k for k in trained if torch.equal(trained[k], init[k])]
    assert not unchanged, f"LoRA weights that did not change: {unchanged}"

    # every base weight (packed 4-bit weights, quant state, embeddings, norms, head) is untouched
    base_after = _base_state(run.trainer.model.get_base_model())
    assert len(base_after) == len(base_before)
    for (k0, v0), (k1, v1) in zip(sorted(base_before.items()), sorted(base_after.items())):
        # bitwise: packed 4-bit storage reinterpreted as floats holds NaN patterns
        assert torch.equal(v0.contiguous().view(torch.uint8), v1.contiguous().view(torch.uint8)), f"base weight {k1} changed"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert METRIC_KEYS <= r.keys()
        assert all(math.isfinite(r[k]) for k in METRIC_KEYS)
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
        assert r["rewards/chosen"] == pytest.approx(cfg.simpo.beta * r["logps/chosen"], abs=1e-5)

    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["base_model"] == str(tiny_base) and meta["global_step"] == 3
    assert meta["simpo"]["gamma_resolved"] == 1.0 and meta["data"]["train"]["kept"] == 64

    from peft import PeftModel

    loaded = PeftModel.from_pretrained(load_base(cfg.model, "cpu"), str(out))
    got = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    for k, v in trained.items():
        assert torch.equal(got[k], v)


def test_refuses_to_overwrite_finished_run(tiny_base, pref_jsonl, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputExists, match="train.output_dir = .* already holds a finished adapter.*--train.overwrite true"):
        train(make_config(tiny_base, pref_jsonl, out, "--train.max_steps", "1"))


def test_resume_from_picks_the_newest_complete_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6: a hard kill while saving
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        if complete:
            (out / f"checkpoint-{step}" / CHECKPOINT_MARKER).write_text("{}")
    (out / "checkpoint-final").mkdir()  # not a step number: not a checkpoint
    assert resolve_resume("auto", out) == str(out / "checkpoint-4")
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-6'}: incomplete" in printed and f"resuming from {out / 'checkpoint-4'}" in printed

    (out / "checkpoint-4" / CHECKPOINT_MARKER).unlink()
    (out / "checkpoint-2" / CHECKPOINT_MARKER).unlink()
    assert resolve_resume("auto", out) is None
    assert "no complete checkpoint" in capsys.readouterr().out
    assert resolve_resume(str(out / "checkpoint-6"), out) == str(out / "checkpoint-6")  # asked for by name: allowed
    assert "has no qsimpo_complete.json" in capsys.readouterr().out
    assert resolve_resume(None, out) is None

    with pytest.raises(InputNotFound, match=r"train.resume_from = '.*checkpoint-9' does not exist.*--train.resume_from auto"):
        resolve_resume(str(out / "checkpoint-9"), out)
    with pytest.raises(InputNotFound, match="checkpoint-final' has no trainer_state.json"):
        resolve_resume(str(out / "checkpoint-final"), out)


def test_resume_command_replaces_any_resume_from(tmp_path):
    argv = ["qsimpo", "train", "my cfg.yaml", "--train.resume_from", "x/checkpoint-4", "--lora.r", "8",
            "--train.resume_from=auto"]
    assert resume_command(argv, tmp_path) == "qsimpo train 'my cfg.yaml' --lora.r 8 --train.resume_from auto"
    assert resume_command(None, tmp_path) == f"qsimpo train {tmp_path / 'config.yaml'} --train.resume_from auto"


def test_resume_from_the_last_step_writes_the_adapter_without_training(tiny_base, pref_jsonl, tmp_path, capsys):
    """A run stopped after its last step but before the adapter was written: resuming adds no step."""
    args = ("--train.max_steps", "2", "--train.save_steps", "2")
    out = train(make_config(tiny_base, pref_jsonl, tmp_path / "run", *args)).output_dir
    finished = load_file(out / "adapter_model.safetensors")
    for name in ("adapter_model.safetensors", "qsimpo.json"):
        (out / name).unlink()
    train(make_config(tiny_base, pref_jsonl, out, *args, "--train.resume_from", "auto"))
    assert "holds the last step (2); writing the adapter" in capsys.readouterr().out
    assert json.loads((out / "qsimpo.json").read_text())["global_step"] == 2
    resumed = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(finished[k], resumed[k]) for k in finished)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()].count(3) == 0


def test_resume_gives_same_adapter(tiny_base, pref_jsonl, tmp_path):
    args = ("--train.max_steps", "4", "--train.save_steps", "2", "--lora.dropout", "0.1")
    full = train(make_config(tiny_base, pref_jsonl, tmp_path / "full", *args)).output_dir
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed_dir / "checkpoint-2")  # as if the run died after step 2
    train(make_config(tiny_base, pref_jsonl, resumed_dir, *args, "--train.resume_from", "auto"))
    a = load_file(full / "adapter_model.safetensors")
    b = load_file(resumed_dir / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert 3 in steps and 4 in steps and 1 not in steps


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("loss", ["simpo", "dpo"])
def test_non_finite_loss_stops_and_keeps_checkpoint(tiny_base, pref_jsonl, tmp_path, monkeypatch, loss):
    out = tmp_path / "run"
    train(make_config(tiny_base, pref_jsonl, out, "--train.max_steps", "2", "--train.save_steps", "2", "--loss.type", loss))
    before = _hashes(out / "checkpoint-2")

    from qsimpo.train import trainer as trainer_mod

    real = trainer_mod.pair_sequence_logps

    def poisoned(*a, **kw):  # the log-probs every loss reads, so the guard is tested whatever the loss
        chosen, rejected = real(*a, **kw)
        return chosen._replace(avg=chosen.avg * float("nan"), sum=chosen.sum * float("nan")), rejected

    monkeypatch.setattr(trainer_mod, "pair_sequence_logps", poisoned)
    cfg = make_config(tiny_base, pref_jsonl, out, "--train.max_steps", "4", "--train.save_steps", "1",
                      "--train.resume_from", "auto", "--train.overwrite", "true", "--loss.type", loss)
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 3.*resume_from auto"):
        train(cfg)
    assert _hashes(out / "checkpoint-2") == before
    assert not (out / "checkpoint-3").exists()


def test_non_finite_gradient_guard():
    from qsimpo.train.callbacks import FiniteGradGuard

    lin = torch.nn.Linear(2, 2)
    lin.weight.grad = torch.tensor([[1.0, float("inf")], [0.0, 0.0]])
    state = type("S", (), {"global_step": 6})()
    with pytest.raises(NonFiniteError, match="non-finite gradient norm .* at step 7"):
        FiniteGradGuard().on_pre_optimizer_step(None, state, None, model=lin)
    lin.weight.grad = torch.zeros(2, 2)
    FiniteGradGuard().on_pre_optimizer_step(None, state, None, model=lin)


@pytest.mark.skipif(not HH_SAMPLE.exists(), reason=f"HH-RLHF sample not found at {HH_SAMPLE} (it lives in the shared folder beside the repo)")
def test_real_hh_rlhf_with_truncation(tmp_path, capsys):
    from qsimpo.config import DataConfig
    from qsimpo.data import read_source
    from qsimpo.quickstart.toy import build_model, build_tokenizer, save_base

    rows = read_source(DataConfig(path=str(HH_SAMPLE), max_rows=120, format="implicit", on_bad_row="skip")).texts()
    tok = build_tokenizer([r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows], vocab_size=512)
    base = save_base(build_model(tok, hidden_size=32, num_layers=2), tok, tmp_path / "base")
    cfg = make_config(base, HH_SAMPLE, tmp_path / "run", "--data.max_rows", "120", "--data.format", "implicit",
                      "--data.max_length", "64", "--data.max_prompt_length", "40", "--data.on_bad_row", "skip",
                      "--train.max_steps", "4", "--train.learning_rate", "1e-3")
    run = train(cfg)
    printed = capsys.readouterr().out
    assert "120 rows read" in printed and "truncated" in printed
    summary = json.loads((run.output_dir / "qsimpo.json").read_text())["data"]["train"]
    assert summary["rows_read"] == 120
    assert summary["kept"] + sum(summary["dropped"].values()) == 120
    assert summary["truncated_prompt"] > 30  # HH prompts are long: many must be cut
    rows = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_config
    from qsimpo.train.recipe import train
    cfg = make_config({base!r}, {data!r}, {out!r}, "--train.max_steps", "3", "--lora.dropout", "0.1", "--loss.type", {loss!r})
    run = train(cfg)
    lora = {{k: v.detach().cpu() for k, v in run.trainer.model.named_parameters() if "lora_" in k}}
    torch.save(lora, os.path.join({out!r}, f"rank{{os.environ['RANK']}}.pt"))
""")


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
@pytest.mark.parametrize("loss", ["simpo", "dpo"])  # dpo: process 0 computes the reference first, the other reads it
def test_two_process_data_parallel(tiny_base, pref_jsonl, tmp_path, loss):
    out = tmp_path / "ddp"
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests"), base=str(tiny_base), data=str(pref_jsonl), out=str(out),
                                        loss=loss))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0.keys() == r1.keys() and len(r0) > 0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    assert (out / "adapter_model.safetensors").exists()
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["global_step"] == 3 and meta["loss"]["type"] == loss
    if loss == "dpo":
        assert meta["reference"]["train"]["pairs"] == 64 and "dpo reference log-probs: 64 train pairs" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_flex_attention_refused_on_cpu_before_loading(tiny_base, pref_jsonl, tmp_path):
    from qsimpo.config import ConfigError

    cfg = make_config(tiny_base, pref_jsonl, tmp_path / "run", "--model.attn_implementation", "flex_attention")
    with pytest.raises(ConfigError, match="flex_attention' trains only on CUDA.*use sdpa"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything was written
