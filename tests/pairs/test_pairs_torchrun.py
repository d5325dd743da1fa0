"""`qsimpo pairs` under torchrun with two processes on the CPU: one file, the same one a single process writes,
the summary said once, and a run killed midway resumed by a second two-process run with no row lost or repeated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port

pytestmark = pytest.mark.usefixtures("processes")  # every test here starts processes: integration tier

SCORER = """import os, time


def by_length(prompt, response):
    time.sleep(float(os.environ.get("SCORER_SLEEP", "0")))
    return len(response)
"""


@pytest.fixture(scope="module")
def setup(tiny_base, pref_rows, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs-torchrun")
    prompts = folder / "prompts.jsonl"
    seen = list(dict.fromkeys(r["prompt"] for r in pref_rows))[:7]  # 7 prompts, batch 2, 2 processes: a last part is empty
    assert len(seen) == 7
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in seen))
    (folder / "scorer.py").write_text(SCORER)
    return folder, prompts


def command(tiny_base, folder, prompts, out, processes: int) -> list[str]:
    """The command of docs/pairs.md; --num-samples, not --n, which torchrun's parser takes as an abbreviation."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    return [sys.executable, *(launcher if processes > 1 else []), "-m", "qsimpo", "pairs", str(prompts), "--model",
            str(tiny_base), "--scorer", f"{folder / 'scorer.py'}:by_length", "--out", str(out), "--num-samples", "3",
            "--max-new-tokens", "8", "--batch-size", "2", "--backend", "transformers"]


def env(sleep: float = 0) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SCORER_SLEEP": str(sleep), "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=600)
    assert done.returncode == 0, " ".join(cmd) + "\n" + done.stdout[-3000:] + done.stderr[-5000:]
    return done


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny_base, setup):
    folder, prompts = setup
    out = folder / "one" / "pairs.jsonl"
    run(command(tiny_base, folder, prompts, out, 1), folder)
    return out


def test_two_processes_write_the_file_one_process_writes(tiny_base, setup, reference):
    folder, prompts = setup
    out = folder / "two" / "pairs.jsonl"
    done = run(command(tiny_base, folder, prompts, out, 2), folder)
    assert lines(out) == lines(reference)  # same rows, same order: answers are seeded per prompt, not per process
    assert len(lines(out)) >= 4, "too few pairs to say anything: the tiny model's answers all tied"
    dropped = lambda p: [(r["prompt_id"], r["reason"]) for r in lines(p)] if p.exists() else []  # noqa: E731
    assert dropped(out.with_name("pairs.jsonl.dropped.jsonl")) == dropped(reference.with_name("pairs.jsonl.dropped.jsonl"))
    assert json.loads(out.with_name("pairs.jsonl.settings.json").read_text()) == \
        json.loads(reference.with_name("pairs.jsonl.settings.json").read_text())
    said = [line for line in done.stdout.splitlines() if line.startswith(f"pairs {out}:")]
    assert len(said) == 1 and "7 prompts read" in said[0], done.stdout  # one summary, for the whole file
    assert not list(out.parent.glob("*part*")) and sorted(p.name for p in out.parent.iterdir()) == sorted(
        p.name for p in reference.parent.iterdir())


def test_a_killed_two_process_run_resumes(tiny_base, setup, reference):
    folder, prompts = setup
    out = folder / "killed" / "pairs.jsonl"
    proc = subprocess.Popen(command(tiny_base, folder, prompts, out, 2), cwd=folder, env=env(sleep=0.3),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # torchrun and both processes, as Ctrl-C or a scheduler would
    proc.wait(timeout=120)
    first = lines(out)
    assert 1 <= len(first) < len(lines(reference)), "killed too late to test a resume"
    done = run(command(tiny_base, folder, prompts, out, 2), folder)
    assert lines(out) == lines(reference)
    said = [line for line in done.stdout.splitlines() if line.startswith(f"pairs {out}:")]
    assert f"({len(lines(reference)) - len(first)} this run)" in said[0], said
