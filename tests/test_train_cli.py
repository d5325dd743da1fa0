"""`qsimpo train` as the user runs it, in a subprocess: what it prints on stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from conftest import ROOT

# What transformers 5 and bitsandbytes printed on every CPU run before qsimpo silenced or avoided them.
NOISE = ("Failed to load CPU gemm_4bit_forward", "kernels-community", "FutureWarning", "is deprecated",
         "gradient_checkpointing", "Warning:")


def write_config(path, base, data, out, **train):
    """A YAML config for the tiny model, the way a user writes one."""
    cfg = {
        "model": {"name_or_path": str(base)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data), "max_length": 96},
        "train": {"output_dir": str(out), "batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1e-2,
                  "warmup_ratio": 0, **train},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def qsimpo(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsimpo", *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=600, **kwargs)


def test_a_normal_run_prints_no_warnings(tiny_base, pref_jsonl, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_base, pref_jsonl, tmp_path / "run", max_steps=2)
    proc = qsimpo("train", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapter written to" in proc.stdout
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, "\n".join(noise)
