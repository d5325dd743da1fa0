"""`qsimpo eval` end to end on the quickstart's adapter: numbers, eval.json schema, report.html, errors."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil

import pytest
import torch

from qsimpo.cli import main

# eval.json's shape: a stable contract for scripts that read it. Change SCHEMA_VERSION with it.
MODEL_KEYS = {"n", "reward_accuracy", "reward_margin_mean", "reward_margin_median", "reward_chosen_mean",
              "reward_rejected_mean", "logp_chosen_mean", "logp_rejected_mean", "simpo_loss", "loss", "length"}
LENGTH_KEYS = {"spearman_length_logp": {"rho", "p_value", "n"},
               "accuracy_by_length": {"chosen_longer", "chosen_shorter", "same_length"},
               "prefers_longer": {"n", "rate"}}
GEN_KEYS = {"n", "mean_length_tokens", "mean_length_words", "distinct_2", "repetition_rate", "unfinished_rate", "empty_rate"}
TOP_KEYS = {"schema_version", "adapter", "base_model", "data", "simpo", "models", "generation", "judge", "training",
            "per_pair", "versions", "seconds"}


@pytest.fixture(scope="module")
def quickstart(quickstart_run):
    """The quickstart's output (base, adapter with data.eval = data/heldout.jsonl), built once per session."""
    return quickstart_run[0]


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory, pref_rows):
    """A 1-layer LlamaForSequenceClassification reward model (num_labels=1) with its tokenizer, saved to a folder."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from qsimpo.quickstart.toy import build_tokenizer

    tok = build_tokenizer([r[k] for r in pref_rows for k in ("prompt", "chosen", "rejected")], vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, num_labels=1, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("judge") / "rm"
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def evaluated(quickstart, tiny_judge):
    """One `qsimpo eval` run: data from the run's data.eval, 2 generations per model, judged."""
    out = quickstart / "eval-out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["eval", str(quickstart / "adapter"), "--generate", "2", "--max-new-tokens", "12",
                   "--judge", str(tiny_judge), "--out", str(out)])
    return rc, out, stdout.getvalue()


def test_eval_shows_alignment_worked(evaluated):
    rc, out, printed = evaluated
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    sft, aligned = result["models"]["sft"], result["models"]["aligned"]
    assert result["data"]["pairs"] == 200 and result["data"]["source"].endswith("heldout.jsonl")  # the run's data.eval
    assert aligned["reward_accuracy"] > sft["reward_accuracy"]
    assert aligned["reward_accuracy"] >= 0.9
    assert aligned["reward_margin_mean"] > sft["reward_margin_mean"]
    assert aligned["simpo_loss"] < sft["simpo_loss"]
    assert result["simpo"] == {"beta": 10.0, "gamma": 3.0, "loss_type": "sigmoid", "label_smoothing": 0.0,
                               "sft_weight": 5.0, "source": "qsimpo.json"}  # the quickstart's config
    assert "reward accuracy" in printed and "eval.json" in printed


def test_eval_matches_in_training_evaluation(quickstart, evaluated):
    """`data.eval` + `train.eval_every` log the same numbers eval computes (same pairs, same definitions)."""
    rows = [json.loads(line) for line in (quickstart / "adapter" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [50, 100, 150]  # quickstart.yaml: eval_every 50, max_steps 150
    last = evals[-1]
    aligned = json.loads((evaluated[1] / "eval.json").read_text())["models"]["aligned"]
    # bitsandbytes' CPU NF4 kernels differ slightly between the trainer's model and a reloaded one (~1e-4 relative)
    assert aligned["reward_accuracy"] == pytest.approx(last["eval_rewards/accuracies"], abs=1 / 200)
    assert aligned["reward_margin_mean"] == pytest.approx(last["eval_rewards/margins"], abs=1e-2)
    assert aligned["reward_chosen_mean"] == pytest.approx(last["eval_rewards/chosen"], abs=1e-2)
    assert aligned["logp_rejected_mean"] == pytest.approx(last["eval_logps/rejected"], abs=1e-3)
    assert aligned["loss"] == pytest.approx(last["eval_loss"], abs=1e-2)  # the run's loss, sft_weight included


def test_eval_json_schema_is_stable(evaluated):
    result = json.loads((evaluated[1] / "eval.json").read_text())
    assert set(result) == TOP_KEYS and result["schema_version"] == 1
    for name in ("sft", "aligned"):
        m = result["models"][name]
        assert set(m) == MODEL_KEYS
        assert {k: set(v) for k, v in m["length"].items()} == LENGTH_KEYS
        assert sum(g["n"] for g in m["length"]["accuracy_by_length"].values()) == m["n"] == 200
    gen = result["generation"]
    assert set(gen) == {"n", "max_new_tokens", "temperature", "top_p", "seed", "sft", "aligned", "samples"}
    assert set(gen["sft"]) == set(gen["aligned"]) == GEN_KEYS and gen["n"] == 2
    assert all(set(s) == {"location", "prompt", "sft", "aligned", "judge_sft", "judge_aligned"} for s in gen["samples"])
    assert 0 < gen["sft"]["mean_length_tokens"] <= 12
    j = result["judge"]
    assert set(j) == {"model", "n", "wins", "losses", "ties", "win_rate", "ci_low", "ci_high", "confidence",
                      "mean_score_sft", "mean_score_aligned"}
    assert j["wins"] + j["losses"] + j["ties"] == j["n"] == 2
    assert 0 <= j["ci_low"] <= j["win_rate"] <= j["ci_high"] <= 1
    pp = result["per_pair"]
    assert set(pp) == {"location", "chosen_len", "rejected_len", "sft_logp_chosen", "sft_logp_rejected",
                       "aligned_logp_chosen", "aligned_logp_rejected"}
    assert all(len(v) == 200 for v in pp.values())
    assert result["training"]["last_step"] == 150


def test_report_html_is_self_contained_with_plots(evaluated):
    html = (evaluated[1] / "report.html").read_text()
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == 3  # margin histogram, length scatter, training curves
    for img in images:
        assert base64.b64decode(img.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("reward accuracy", "Spearman", "chosen is longer", "distinct-2", "Wilson"):
        assert text in html
    assert "http://" not in html and "https://" not in html  # nothing fetched when it is opened


def test_eval_fraction_fallback_uses_the_runs_split(quickstart, tmp_path, capsys):
    """data.eval as a fraction: eval re-creates the held-out pairs with the run's seed."""
    import yaml

    from qsimpo.data import build_dataset, split_eval
    from qsimpo.run_dir import read_config as run_config
    from qsimpo.train.model import load_tokenizer

    adapter = tmp_path / "adapter"
    shutil.copytree(quickstart / "adapter", adapter, ignore=shutil.ignore_patterns("checkpoint-*", "eval*"))
    cfg = yaml.safe_load((adapter / "config.yaml").read_text())
    cfg["data"].update(path=str(quickstart / "data" / "heldout.jsonl"), eval="0.05")
    (adapter / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(adapter), "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    run = run_config(str(adapter))
    pairs, _ = build_dataset(run.data, load_tokenizer(run.model))
    _, held = split_eval(pairs, 0.05, run.train.seed)
    assert result["data"]["pairs"] == 10 and result["per_pair"]["location"] == [p["location"] for p in held]
    assert "held out by the run" in result["data"]["source"]


def _eval_error(argv, capsys) -> str:
    assert main(["eval", *argv]) == 2
    return capsys.readouterr().err


def test_bad_data_path_is_a_clear_error(quickstart, capsys):
    err = _eval_error([str(quickstart / "adapter"), "--data", str(quickstart / "nope.jsonl")], capsys)
    assert "--data" in err and "nope.jsonl: no such file or folder" in err


def test_bad_held_out_rows_stop_eval_before_the_model_loads(quickstart, tmp_path, capsys, monkeypatch):
    import qsimpo.eval.evaluate as ev

    monkeypatch.setattr(ev, "load", lambda *a: pytest.fail("the model was loaded before the data was judged"))
    bad = tmp_path / "held.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\nnot json\n')
    err = _eval_error([str(quickstart / "adapter"), "--data", str(bad)], capsys)
    assert f"held-out data {bad}" in err and f"{bad}:line 2: missing_key" in err and f"{bad}:line 3: malformed_json" in err


def test_missing_base_is_a_clear_error(quickstart, tmp_path, capsys):
    adapter = tmp_path / "moved-adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml"):
        shutil.copy(quickstart / "adapter" / name, adapter / name)
    meta = json.loads((quickstart / "adapter" / "qsimpo.json").read_text())
    (adapter / "qsimpo.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone" / "base")}))
    err = _eval_error([str(adapter)], capsys)
    assert "gone/base" in err and "was not found" in err and "--base" in err
    # no qsimpo.json at all (e.g. an adapter made by another tool): ask for --base
    (adapter / "qsimpo.json").unlink()
    assert "--base" in _eval_error([str(adapter)], capsys)


def test_other_usage_errors(quickstart, tmp_path, capsys):
    assert "no such folder" in _eval_error([str(tmp_path / "missing-adapter")], capsys)
    assert "adapter_config.json" in _eval_error([str(tmp_path)], capsys)
    assert "--generate" in _eval_error([str(quickstart / "adapter"), "--judge", "x"], capsys)
