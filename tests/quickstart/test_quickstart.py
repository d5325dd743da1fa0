"""The embedded default: `qsimpo quickstart` end to end, offline, on the CPU."""

import json
import shutil

from qsimpo.cli import main


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
    assert f"held-out reward accuracy: SFT {before['reward_accuracy']:.3f} -> aligned {after['reward_accuracy']:.3f}" in again
    assert weights.stat().st_mtime_ns == stamp
    # a folder holding anything a quickstart does not write is not its to replace
    (out / "notes.txt").write_text("mine")
    try:
        assert main(["quickstart", "--tiny", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "holds what a quickstart does not write (notes.txt)" in err and "--overwrite" in err
    finally:
        (out / "notes.txt").unlink()


def test_an_earlier_output_of_other_inputs_is_rebuilt_and_the_votes_kept(tmp_path):
    from qsimpo.quickstart import prepare_output

    out = tmp_path / "quickstart"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "quickstart.json").write_text(json.dumps({"inputs": {"qsimpo": "0.0.1"}}))
    (out / "votes.jsonl").write_text('{"vote": "right"}\n')  # what `qsimpo demo` appends beside the adapter
    assert prepare_output(out, False, {"qsimpo": "0.0.1"}) == (out, {"inputs": {"qsimpo": "0.0.1"}})  # the same: reused
    assert prepare_output(out, False, {"qsimpo": "0.1.0"}) == (out, None)  # other inputs: rebuilt
    assert sorted(p.name for p in out.iterdir()) == ["votes.jsonl"]  # the quickstart's files go, the user's votes stay
    (out / "data").mkdir()  # an unfinished run of its own (no quickstart.json): rebuilt
    assert prepare_output(out, False, {"qsimpo": "0.1.0"}) == (out, None) and not (out / "data").exists()
    assert prepare_output(out, True, {"qsimpo": "0.1.0"}) == (out, None) and not out.exists()  # --overwrite: all of it


def test_inspect_data_shows_boundary(tiny_base, pref_jsonl, capsys):
    cfg_path = tiny_base.parent / "inspect.yaml"
    cfg_path.write_text(f"model:\n  name_or_path: {tiny_base}\ndata:\n  path: {pref_jsonl}\n")
    assert main(["inspect-data", str(cfg_path), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "64 rows read, 64 kept" in out
    assert "response" in out and "<s>" in out and "</s>" in out
