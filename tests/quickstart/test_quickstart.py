"""The embedded default: `qsimpo quickstart` end to end, offline, on the CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qsimpo.cli import main
from tests.conftest import ROOT


def test_quickstart_learns_the_preference(quickstart_run, capsys, tmp_path):
    out, printed = quickstart_run
    result = json.loads((out / "quickstart.json").read_text())
    before, after = result["before"], result["after"]
    assert after["reward_accuracy"] >= 0.9
    assert before["reward_accuracy"] <= 0.75  # the SFT model has no preference (length decides)
    assert after["kind_style_rate"] > before["kind_style_rate"]
    assert after["kind_style_rate"] >= 0.8
    assert {"adapter_config.json", "adapter_model.safetensors", "qsimpo.json", "metrics.jsonl"} <= {p.name for p in (out / "adapter").iterdir()}
    assert (out / "base" / "config.json").exists() and (out / "data" / "train.jsonl").exists()
    metrics = [json.loads(line) for line in (out / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in m for m in metrics)  # data.eval is scored during training
    assert "held-out reward accuracy: SFT" in printed

    # run again, it shows its finished result again: nothing retrained, nothing refused. (On a copy of the run's own
    # files: other tests write their outputs into the shared quickstart folder.)
    copy = tmp_path / "quickstart"
    for name in ("data", "base", "adapter", "quickstart.json"):
        (shutil.copytree if (out / name).is_dir() else shutil.copy2)(out / name, copy / name)
    out = copy
    weights = out / "adapter" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["quickstart", "--tiny", "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert "finished run: its result again" in again and "[2/4]" not in again
    assert "nothing was run again" in again and "wrote" not in again
    assert f"held-out reward accuracy: SFT {before['reward_accuracy']:.3f} -> aligned {after['reward_accuracy']:.3f}" in again
    assert weights.stat().st_mtime_ns == stamp
    # a folder holding anything a quickstart does not write is not its to replace
    (out / "notes.txt").write_text("mine")
    try:
        assert main(["quickstart", "--tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "holds files qsimpo does not write there (notes.txt)" in err and "--overwrite" in err
    finally:
        (out / "notes.txt").unlink()


def test_an_earlier_output_is_shown_resumed_reported_or_refused_never_removed_silently(tmp_path):
    from qsimpo.errors import OutputExists
    from qsimpo.quickstart import NEW, REPORT, RESUME, SHOW, prepare_output

    out = tmp_path / "quickstart"
    (out / "adapter" / "checkpoint-50").mkdir(parents=True)
    (out / "quickstart.json").write_text(json.dumps({"inputs": {"qsimpo": "0.0.1"}}))
    (out / "votes.jsonl").write_text('{"vote": "right"}\n')  # what `qsimpo demo` appends beside the adapter
    assert prepare_output(out, False, {"qsimpo": "0.0.1"})[1] == RESUME  # interrupted: resumed
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    assert prepare_output(out, False, {"qsimpo": "0.0.1"})[1] == REPORT  # finished by `qsimpo train`: the report
    (out / "quickstart.json").write_text(json.dumps({"inputs": {"qsimpo": "0.0.1"}, "after": {}}))
    assert prepare_output(out, False, {"qsimpo": "0.0.1"})[1:] == (SHOW, {"inputs": {"qsimpo": "0.0.1"}, "after": {}})
    with pytest.raises(OutputExists, match=r"adapter \(a finished adapter\), .*checkpoint-50\), which was made from "
                                           r"other inputs \(qsimpo '0.0.1' -> '0.1.0'\).*--overwrite"):
        prepare_output(out, False, {"qsimpo": "0.1.0"})  # other inputs: refused, naming the training it would remove
    (out / "quickstart.json").unlink()
    with pytest.raises(OutputExists, match="has no quickstart.json saying what it was made from"):
        prepare_output(out, False, {"qsimpo": "0.1.0"})
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    shutil.rmtree(out / "adapter")
    (out / "data").mkdir()  # data alone, no training: rebuilt, and the user's votes stay
    assert prepare_output(out, False, {"qsimpo": "0.1.0"}) == (out, NEW, None)
    assert sorted(p.name for p in out.iterdir()) == ["votes.jsonl"]
    assert prepare_output(out, True, {"qsimpo": "0.1.0"}) == (out, NEW, None) and not out.exists()  # --overwrite: all


def _qsimpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qsimpo", *args], env=env, capture_output=True, text=True, timeout=1200)


def _interrupted_copy(run: Path, dest: Path, step: int = 100) -> Path:
    """What an interrupted `qsimpo quickstart --tiny` leaves: its data, base, record of inputs, the config and
    log of its training and a complete checkpoint, but no final adapter (built from a finished run's files)."""
    record = json.loads((run / "quickstart.json").read_text())
    for name in ("data", "base"):
        shutil.copytree(run / name, dest / name)
    (dest / "adapter").mkdir()
    shutil.copytree(run / "adapter" / f"checkpoint-{step}", dest / "adapter" / f"checkpoint-{step}")
    shutil.copy2(run / "adapter" / "config.yaml", dest / "adapter" / "config.yaml")
    rows = [r for r in (run / "adapter" / "metrics.jsonl").read_text().splitlines() if json.loads(r).get("step", 0) <= step]
    (dest / "adapter" / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    (dest / "quickstart.json").write_text(json.dumps({"inputs": record["inputs"]}))
    return dest


@pytest.mark.usefixtures("processes")  # starts qsimpo as a process, as a user does: integration tier
def test_a_rerun_resumes_an_interrupted_quickstart_and_reports_one_finished_by_train(quickstart_run, tmp_path):
    run, _ = quickstart_run
    out = _interrupted_copy(run, tmp_path / "quickstart")
    done = _qsimpo("quickstart", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted training: resuming it" in done.stdout and "[1/4]" not in done.stdout
    assert "resuming from" in done.stdout + done.stderr and "starting from scratch" not in done.stdout + done.stderr
    steps = [json.loads(r).get("step") for r in (out / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 5 and max(steps) == 150  # the log of steps 1-100 kept, steps 101-150 appended
    assert json.loads((out / "quickstart.json").read_text())["after"]["reward_accuracy"] >= 0.9

    # The quickstart's advice when interrupted: `qsimpo train <its config.yaml> --train.resume_from auto`. The
    # training then finishes outside the quickstart, and the next quickstart reports on it, keeping it.
    out = _interrupted_copy(run, tmp_path / "by-train")
    cfg = out / "adapter" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(run), str(out)))
    trained = _qsimpo("train", str(cfg), "--train.resume_from", "auto", "--train.progress", "false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    weights = out / "adapter" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    done = _qsimpo("quickstart", "--tiny", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished training: comparing it" in done.stdout and "[2/4]" not in done.stdout and "[3/4]" in done.stdout
    assert weights.stat().st_mtime_ns == stamp
    assert f"wrote {out / 'quickstart.json'}" in done.stdout


def test_a_rerun_refuses_to_remove_training_it_cannot_vouch_for(quickstart_run, tmp_path):
    run, _ = quickstart_run
    out = _interrupted_copy(run, tmp_path / "quickstart")
    (out / "quickstart.json").unlink()  # left by an older qsimpo, or by hand
    done = _qsimpo("quickstart", "--tiny", "--out", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "checkpoint-100" in done.stderr and "--overwrite" in done.stderr
    assert (out / "adapter" / "checkpoint-100").is_dir() and (out / "adapter" / "metrics.jsonl").is_file()


def test_inspect_data_shows_boundary(tiny_base, pref_jsonl, capsys):
    cfg_path = tiny_base.parent / "inspect.yaml"
    cfg_path.write_text(f"model:\n  name_or_path: {tiny_base}\ndata:\n  path: {pref_jsonl}\n")
    assert main(["inspect-data", str(cfg_path), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "64 rows read, 64 kept" in out
    assert "response" in out and "<s>" in out and "</s>" in out
