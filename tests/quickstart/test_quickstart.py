"""The embedded default: `qsimpo quickstart` end to end, offline, on the CPU."""

import json

import pytest

from qsimpo.cli import main


def test_quickstart_learns_the_preference(quickstart_run, capsys):
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

    # a second run refuses to clobber the first
    assert main(["quickstart", "--tiny", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_inspect_data_shows_boundary(tiny_base, pref_jsonl, capsys):
    cfg_path = tiny_base.parent / "inspect.yaml"
    cfg_path.write_text(f"model:\n  name_or_path: {tiny_base}\ndata:\n  path: {pref_jsonl}\n")
    assert main(["inspect-data", str(cfg_path), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "64 rows read, 64 kept" in out
    assert "response" in out and "<s>" in out and "</s>" in out
