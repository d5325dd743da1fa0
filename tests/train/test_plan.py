"""`qsimpo plan`: the memory estimate's parts, the fit verdict and the advice."""

from pathlib import Path

import pytest
from transformers import LlamaConfig

from qsimpo.config import load_config
from qsimpo.train.plan import GiB, estimate, eval_estimate, parse_size, plan, shape_of, worst_batch

ROOT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LLAMA3_8B = LlamaConfig(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
                        num_attention_heads=32, num_key_value_heads=8)


def _cfg(*extra):
    return load_config(None, ["--model.name_or_path", "m", "--data.path", "d", *extra])


def test_llama3_8b_parts():
    parts = estimate(_cfg("--data.max_length", "2048", "--train.batch_size", "4"), shape_of(LLAMA3_8B))
    # 32 layers × (2·4096² + 2·4096·1024 + 3·4096·14336) = 6.98e9 linear params at 4.127 bits ≈ 3.35 GiB,
    # plus embeddings and head (2 × 128256 × 4096) in bf16 ≈ 1.96 GiB
    assert parts["base weights"] / GiB == pytest.approx(3.35 + 1.96, abs=0.05)
    # LoRA r=16 on all 7 linears: 32 × 16 × (2·8192 + 2·5120 + 3·18432) = 4.19e7 params × 16 B ≈ 0.62 GiB
    assert parts["LoRA weights + grads + AdamW"] / GiB == pytest.approx(0.625, abs=0.01)
    # the chunked head, sized by the vocabulary: one [512, 128256] fp32 block + its bf16 matmul output ≈ 0.37 GiB
    assert parts["output head"] / GiB == pytest.approx(0.367, abs=0.01)
    capped = LlamaConfig(**{**LLAMA3_8B.to_dict(), "final_logit_softcapping": 30.0})
    assert estimate(_cfg("--data.max_length", "2048", "--train.batch_size", "4"), shape_of(capped))["output head"] / GiB \
        == pytest.approx(0.367 * 2.5 / 1.5, abs=0.01)  # the soft-cap's tanh is a second fp32 block in backward
    # the dense packed mask: 4 rows × 4096² × (bf16 + bool) = 0.1875 GiB; flex_attention's block mask: ~0
    assert parts["attention mask"] / GiB == pytest.approx(0.1875)
    flex = estimate(_cfg("--data.max_length", "2048", "--train.batch_size", "4", "--model.attn_implementation",
                         "flex_attention"), shape_of(LLAMA3_8B))
    assert flex["attention mask"] == 0


def test_full_logits_cost_and_advice():
    cfg = _cfg("--data.max_length", "2048", "--train.batch_size", "4", "--train.head_chunk_size", "0")
    text, fits = plan(cfg, parse_size("24GiB"), LLAMA3_8B)
    assert not fits and "--train.head_chunk_size null" in text
    chunked, fits2 = plan(_cfg("--data.max_length", "2048", "--train.batch_size", "1"), parse_size("24GiB"), LLAMA3_8B)
    assert fits2 and chunked.rstrip().endswith("fits")


def test_parse_size():
    assert parse_size("24GiB") == 24 * GiB and parse_size("80GB") == 80 * 10**9 and parse_size("16") == 16 * GiB
    with pytest.raises(ValueError, match="24GiB"):
        parse_size("lots")


def test_plan_cli_reads_a_local_model(tiny_base, pref_jsonl, tmp_path, capsys):
    from qsimpo.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_base}\ndata:\n  path: {pref_jsonl}\n")
    assert main(["plan", str(cfg), "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak" in out and "fits" in out and "every row at max_length 1024" in out
    assert main(["plan", str(cfg), "--gpu-memory", "1GiB", "--data"]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "longest of" in out  # the data summary, then the data's own worst batch


def test_worst_batch_follows_the_layout():
    lengths = [(10, 5, 3), (100, 40, 60), (2, 1, 1), (50, 50, 10), (7, 300, 2)]  # (prompt, chosen, rejected)
    dense = worst_batch(_cfg("--train.batch_size", "2"), lengths)
    # the two longest packed rows: 309 and 200 tokens, padded to 309; mask 2 × 309²
    assert (dense.tokens, dense.mask_cells, dense.scored) == (2 * 309, 2 * 309**2, 302 + 100)
    flex = worst_batch(_cfg("--train.batch_size", "2", "--model.attn_implementation", "flex_attention"), lengths)
    assert (flex.tokens, flex.mask_cells) == (309 + 200, 0)  # one padding-free row
    plain = worst_batch(_cfg("--train.batch_size", "2", "--train.packing", "none"), lengths)
    assert plain.tokens == 4 * 307  # 2 chosen + 2 rejected rows padded to the longest sequence (7 + 300)
    # the widest sequence need not belong to the pair with the most tokens: (150, 10, 10) pads a batch to 160
    wide = worst_batch(_cfg("--train.batch_size", "1", "--train.packing", "none"), [(1, 100, 100), (150, 10, 10)])
    assert wide.tokens == 2 * 160 and wide.scored == 200
    # the data's worst batch costs less than the max_length worst case
    cfg = _cfg("--train.batch_size", "2")
    assert sum(estimate(cfg, shape_of(LLAMA3_8B), dense).values()) < sum(estimate(cfg, shape_of(LLAMA3_8B)).values())


def test_fsdp_splits_the_weights_per_process_and_checks_the_load():
    cfg = _cfg("--data.max_length", "2048", "--train.batch_size", "1", "--train.fsdp", "true")
    one, two = estimate(cfg, shape_of(LLAMA3_8B)), estimate(cfg, shape_of(LLAMA3_8B), processes=2)
    assert two["base weights"] == pytest.approx(one["base weights"] / 2)
    assert two["LoRA weights + grads + AdamW"] == pytest.approx(one["LoRA weights + grads + AdamW"] / 2)
    # the largest unit FSDP gathers is the [128256, 4096] bf16 head/embedding (0.98 GiB), in use + prefetched,
    # less the half each process already holds
    assert two["FSDP gathered units"] / GiB == pytest.approx(2 * 0.978 / 2, abs=0.01)
    assert estimate(_cfg("--data.max_length", "2048", "--train.batch_size", "1"), shape_of(LLAMA3_8B), processes=2) == \
        estimate(_cfg("--data.max_length", "2048", "--train.batch_size", "1"), shape_of(LLAMA3_8B))  # DDP: whole copies
    text, fits = plan(cfg, parse_size("24GiB"), LLAMA3_8B, processes=2)
    assert fits and "FSDP splits the base and the LoRA state 2 ways" in text and "while loading (whole base)" in text
    text, fits = plan(cfg, parse_size("6GiB"), LLAMA3_8B, processes=8)  # sharded it would fit; the load does not
    assert not fits and "loads the whole base before FSDP splits it" in text
    assert "pass --processes N" in plan(cfg, parse_size("24GiB"), LLAMA3_8B)[0]


def test_plan_processes_on_the_command_line(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "qsimpo", "plan", str(ROOT / "configs" / "quickstart.yaml"), "--data",
                           "--processes", "0"], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "--processes: '0' is not a whole number >= 1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "tokenizing" not in done.stderr  # refused before any data is read


def test_plan_says_whether_eval_fits_and_at_which_batch():
    cfg = load_config(ROOT_CONFIGS / "llama3-8b-instruct.yaml")
    shape = shape_of(LLAMA3_8B)
    # no gradients: base 5.31 + dequantized linear 0.11 + LoRA weights alone (4.19e7 × 4 B) 0.16 + one layer's
    # activations for 8 rows of 4096 tokens (32768 × (6·4096 + 4·14336) × 2 B) 5.0 + the dense mask
    # (8 × 4096² × 3 B) 0.375 + one head block 0.367 + CUDA context 0.75
    need = eval_estimate(cfg, shape, 8)
    assert need / GiB == pytest.approx(5.31 + 0.11 + 0.16 + 5.0 + 0.375 + 0.367 + 0.75, abs=0.03)
    assert eval_estimate(cfg, shape, 4) < need
    text, fits = plan(cfg, parse_size("24GiB"), LLAMA3_8B)
    assert fits and f"qsimpo eval, --batch-size 8: {need / GiB:.2f} GiB on one device: fits" in text
    tight = (need + sum(estimate(cfg, shape).values())) / 2  # training fits, eval at 8 does not
    text, fits = plan(cfg, int(tight), LLAMA3_8B)
    batch = max(b for b in range(1, 8) if eval_estimate(cfg, shape, b) <= tight)
    assert fits and f"pass --batch-size {batch}" in text
    # eval loads the base with SDPA and the vocabulary-sized head, whatever the run trained with
    for extra in (["--model.attn_implementation", "flex_attention"], ["--train.head_chunk_size", "0"],
                  ["--model.compute_dtype", "float32"]):
        assert eval_estimate(load_config(ROOT_CONFIGS / "llama3-8b-instruct.yaml", extra), shape, 8) == need


def test_plan_reports_the_dpo_reference_pass():
    """DPO's one-time pass is a forward without gradients at the training batch size; other losses have none."""
    shape = shape_of(LLAMA3_8B)
    simpo = _cfg("--data.max_length", "2048", "--train.batch_size", "4")
    dpo = _cfg("--data.max_length", "2048", "--train.batch_size", "4", "--loss.type", "dpo")
    assert "reference pass" not in plan(simpo, parse_size("24GiB"), LLAMA3_8B)[0]
    text, fits = plan(dpo, parse_size("24GiB"), LLAMA3_8B)
    need = eval_estimate(dpo, shape, 4)
    assert fits and f"dpo reference pass, once before the first step: every pair (--data counts them), forward only" in text
    assert f"{need / GiB:.2f} GiB peak (within the training peak)" in text
    # the pass changes no training part: a DPO step costs what a SimPO step costs
    assert estimate(dpo, shape) == estimate(simpo, shape)
    lengths = [(100, 200, 300)] * 5
    assert "5 pairs, forward only" in plan(dpo, parse_size("24GiB"), LLAMA3_8B, lengths)[0]
