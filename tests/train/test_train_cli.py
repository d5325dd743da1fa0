"""`qsimpo train` as the user runs it, in a subprocess: what it prints on stderr, and what SIGINT / SIGTERM
leave behind (a resumable checkpoint, exit code 130, the command that resumes)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import ROOT
from qsimpo.run_dir import CHECKPOINT_MARKER

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


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_a_normal_run_prints_no_warnings(tiny_base, pref_jsonl, tmp_path):
    config = write_config(tmp_path / "run.yaml", tiny_base, pref_jsonl, tmp_path / "run", max_steps=2)
    proc = qsimpo("train", config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adapter written to" in proc.stdout
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, "\n".join(noise)


# `qsimpo train` with every micro-batch slowed down by SLOW_S seconds from step FROM_STEP on, so a signal
# lands in the middle of a step and the test can tell a stop after the step from a stop at once.
SLOW_TRAIN = textwrap.dedent("""
    import sys, time
    from qsimpo.train import trainer
    slow_s, from_step = float(sys.argv.pop(1)), int(sys.argv.pop(1))
    original = trainer.SimPOTrainer.training_step
    def training_step(self, *args, **kwargs):
        if self.state.global_step >= from_step:
            time.sleep(slow_s)
        return original(self, *args, **kwargs)
    trainer.SimPOTrainer.training_step = training_step
    from qsimpo.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start_slow(tmp_path, slow_s: float, from_step: int, *args) -> subprocess.Popen:
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAIN)
    return subprocess.Popen([sys.executable, str(script), str(slow_s), str(from_step), "train", *map(str, args)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=300.0):
    """Poll until ``path`` exists (the run got that far); fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before {path.name} appeared:\n{out[-2000:]}\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)


def logged_steps(out) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_the_printed_command_resumes(sig, tiny_base, pref_jsonl, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_base, pref_jsonl, out, max_steps=6, save_steps=100)
    proc = start_slow(tmp_path, 0.5, 0, config, "--train.progress", "false")
    wait_for(out / "metrics.jsonl", proc)  # step 1 is logged: the run is in step 2
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert f"{sig.name}: finishing this step" in err
    reached = logged_steps(out)[-1]
    assert 1 < reached < 6
    checkpoint = out / f"checkpoint-{reached}"
    command = f"qsimpo train {config} --train.progress false --train.resume_from auto"
    assert f"error: stopped by {sig.name} after step {reached} of 6; the last complete checkpoint is {checkpoint}. " \
           f"Resume with:\n  {command}\n" in err
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
            CHECKPOINT_MARKER} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == reached
    assert [p.name for p in out.glob("checkpoint-*")] == [checkpoint.name]
    assert not (out / "adapter_model.safetensors").exists()  # no finished adapter from an unfinished run

    if sig == signal.SIGTERM:  # a newer checkpoint a hard kill left half-written: auto must pass it over
        fake = out / "checkpoint-5"
        fake.mkdir()
        (fake / "adapter_config.json").write_text("{}")
    args = shlex.split(err.split("Resume with:\n")[1].splitlines()[0])
    assert args[:2] == ["qsimpo", "train"]
    resumed = qsimpo(*args[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stdout
    if sig == signal.SIGTERM:
        assert f"skipping {out / 'checkpoint-5'}: incomplete" in resumed.stdout
    assert json.loads((out / "qsimpo.json").read_text())["global_step"] == 6
    assert logged_steps(out) == list(range(1, 7))


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_second_signal_stops_at_once(tiny_base, pref_jsonl, tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_base, pref_jsonl, out, max_steps=4, save_steps=1, progress=False)
    proc = start_slow(tmp_path, 30.0, 1, config)  # step 2 would take 30 s
    wait_for(out / "checkpoint-1" / CHECKPOINT_MARKER, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 10, "the second signal did not stop the run at once"
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert (f"error: stopped at once by a second signal (SIGTERM); the last complete checkpoint is {out / 'checkpoint-1'}. "
            f"Resume with:\n  qsimpo train {config} --train.resume_from auto") in err
    assert not (out / "checkpoint-2").exists()
