"""`qsimpo eval` end to end on the quickstart's adapter: numbers, eval.json schema, report.html, --scorer, errors."""

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
TOP_KEYS = {"schema_version", "adapter", "base_model", "data", "simpo", "models", "preference_skipped", "generation",
            "scorer", "training", "per_pair", "versions", "seconds"}
SAMPLE_KEYS = {"location", "prompt", "sft", "aligned", "sft_tokens", "aligned_tokens"}
SCORER_KEYS = {"spec", "kind", "temperature", "n", "confidence", "resamples", "seed", "mean_score", "mean_score_ci", "wins",
               "losses", "ties", "win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "lc_slope", "lc_fallback",
               "mean_length_tokens", "judge_cut"}
# a Python scorer as a file: the answer's length in words (so length explains every win)
WORDS_SCORER = "def words(prompt, response):\n    assert prompt[-1]['role'] == 'user'\n    return len(response.split())\n"


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
    """One `qsimpo eval` run: data from the run's data.eval, 2 greedy answers per model, judged by a reward model."""
    out = quickstart / "eval-out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["eval", str(quickstart / "adapter"), "--generate", "2", "--max-new-tokens", "12",
                   "--scorer", str(tiny_judge), "--out", str(out)])
    return rc, out, stdout.getvalue()


def run_eval(argv: list[str]) -> tuple[dict, str, str]:
    """`qsimpo eval ARGV --out OUT` must succeed: (eval.json, report.html, what it printed)."""
    out = argv[argv.index("--out") + 1]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["eval", *argv]) == 0
    from pathlib import Path

    return json.loads((Path(out) / "eval.json").read_text()), (Path(out) / "report.html").read_text(), stdout.getvalue()


@pytest.fixture(scope="module")
def few_pairs(quickstart, tmp_path_factory):
    """The first 6 held-out pairs of the quickstart, and 3 of their prompts alone (a prompts-only source)."""
    rows = [json.loads(line) for line in (quickstart / "data" / "heldout.jsonl").read_text().splitlines()]
    folder = tmp_path_factory.mktemp("held")
    pairs, prompts = folder / "pairs.jsonl", folder / "prompts.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    seen = list(dict.fromkeys(r["prompt"] for r in rows))[:3]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in seen))
    return pairs, prompts


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
                               "sft_weight": 5.0, "sft_reduction": "pairs", "source": "qsimpo.json"}  # the quickstart's config
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
    assert set(result) == TOP_KEYS and result["schema_version"] == 2
    assert result["data"]["kind"] == "pairs" and result["preference_skipped"] is None
    for name in ("sft", "aligned"):
        m = result["models"][name]
        assert set(m) == MODEL_KEYS
        assert {k: set(v) for k, v in m["length"].items()} == LENGTH_KEYS
        assert sum(g["n"] for g in m["length"]["accuracy_by_length"].values()) == m["n"] == 200
    gen = result["generation"]
    assert set(gen) == {"n", "max_new_tokens", "temperature", "top_p", "seed", "sft", "aligned", "samples"}
    assert set(gen["sft"]) == set(gen["aligned"]) == GEN_KEYS and gen["n"] == 2
    assert all(set(s) == SAMPLE_KEYS | {"sft_score", "aligned_score"} for s in gen["samples"])
    assert 0 < gen["sft"]["mean_length_tokens"] <= 12 and gen["temperature"] == 0  # --scorer: greedy by default
    j = result["scorer"]
    assert set(j) == SCORER_KEYS and j["kind"] == "reward_model" and j["temperature"] == 0
    assert j["wins"] + j["losses"] + j["ties"] == j["n"] == 2
    assert j["win_rate_ci"][0] <= j["win_rate"] <= j["win_rate_ci"][1] and 0 <= j["lc_win_rate"] <= 1
    pp = result["per_pair"]
    assert set(pp) == {"location", "chosen_len", "rejected_len", "sft_logp_chosen", "sft_logp_rejected",
                       "aligned_logp_chosen", "aligned_logp_rejected"}
    assert all(len(v) == 200 for v in pp.values())
    assert result["training"]["last_step"] == 150


def test_report_html_is_self_contained_with_plots(evaluated):
    html = (evaluated[1] / "report.html").read_text()
    images = html.split('src="data:image/png;base64,')[1:]
    assert len(images) == 4  # margin histogram, length scatter, training curves, outcome vs length difference
    for img in images:
        assert base64.b64decode(img.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("reward accuracy", "Spearman", "chosen is longer", "distinct-2", "length-controlled win rate",
                 "bootstrap", "score aligned"):
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
    capsys.readouterr()
    assert main(["eval", *argv]) == 2
    return capsys.readouterr().err


def test_bad_data_path_is_a_clear_error(quickstart, capsys):
    err = _eval_error([str(quickstart / "adapter"), "--data", str(quickstart / "nope.jsonl")], capsys)
    assert "--data" in err and "nope.jsonl: file not found" in err


def test_bad_held_out_rows_stop_eval_before_the_model_loads(quickstart, tmp_path, capsys, monkeypatch):
    import qsimpo.load

    monkeypatch.setattr(qsimpo.load, "load_adapter", lambda *a, **k: pytest.fail("the model was loaded before the data was judged"))
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
    assert "--scorer" in _eval_error([str(quickstart / "adapter"), "--generate", "0", "--scorer", "x.py:f"], capsys)
    # --judge is retired: one scorer option for pairs and eval, named in the message with the value given
    assert "--judge was replaced by --scorer" in (err := _eval_error([str(quickstart / "adapter"), "--judge", "rm"], capsys))
    assert "pass --scorer rm" in err


# ------------------------------------------------------------------------------------------- --scorer
def test_reward_model_scores_are_the_pairs_scorers(evaluated, tiny_judge):
    """One home for scoring answers: eval's scores are what qsimpo.pairs.scorers gives the same prompt and answer."""
    from qsimpo.eval import metrics as M
    from qsimpo.pairs.scorers import load_scorer

    result = json.loads((evaluated[1] / "eval.json").read_text())
    samples = result["generation"]["samples"]
    rm = load_scorer(str(tiny_judge), "cpu", batch_size=1)
    for s in samples:
        user = [{"role": "user", "content": s["prompt"]}]
        assert rm([user, user], [s["sft"], s["aligned"]], ["here", "here"]) == pytest.approx(
            [s["sft_score"], s["aligned_score"]], abs=1e-4)
    again = M.scored_answers([s["sft_score"] for s in samples], [s["aligned_score"] for s in samples],
                             [s["sft_tokens"] for s in samples], [s["aligned_tokens"] for s in samples], seed=0)
    assert {k: result["scorer"][k] for k in again} == again  # eval.json's numbers, recomputed from its samples
    assert f"scorer {tiny_judge}, 2 prompts: mean score SFT" in evaluated[2] and "length-controlled" in evaluated[2]


def test_file_and_module_scorers(quickstart, few_pairs, tmp_path):
    """path/file.py:function and module:function; without --generate, --scorer answers every held-out prompt greedily."""
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text(WORDS_SCORER)
    adapter, pairs = str(quickstart / "adapter"), str(few_pairs[0])
    result, html, printed = run_eval([adapter, "--data", pairs, "--max-new-tokens", "10", "--scorer", f"{scorer}:words",
                                      "--out", str(tmp_path / "file")])
    distinct = len({json.loads(line)["prompt"] for line in few_pairs[0].read_text().splitlines()})
    j, samples = result["scorer"], result["generation"]["samples"]
    assert j["spec"] == f"{scorer}:words" and j["kind"] == "python" and j["n"] == distinct == result["generation"]["n"]
    assert result["generation"]["temperature"] == 0 and result["data"]["pairs"] == 6  # the preference metrics too
    assert all(s["sft_score"] == len(s["sft"].split()) and s["aligned_score"] == len(s["aligned"].split()) for s in samples)
    assert j["mean_score"]["aligned"] == pytest.approx(sum(s["aligned_score"] for s in samples) / distinct)
    assert j["mean_length_tokens"]["aligned"] == pytest.approx(sum(s["aligned_tokens"] for s in samples) / distinct)
    assert f"scorer {scorer}:words, {distinct} prompts" in printed and "aligned vs SFT: win rate" in printed
    # module:function, here the example scorer qsimpo ships; the same answers (greedy), other scores
    shipped, _, _ = run_eval([adapter, "--data", pairs, "--max-new-tokens", "10", "--generate", "2",
                              "--scorer", "qsimpo.pairs.examples:concise_complete", "--out", str(tmp_path / "module")])
    from qsimpo.pairs.examples import concise_complete

    assert shipped["scorer"]["kind"] == "python" and shipped["scorer"]["n"] == 2
    for s, first in zip(shipped["generation"]["samples"], samples):
        assert (s["sft"], s["aligned"]) == (first["sft"], first["aligned"])
        assert s["aligned_score"] == concise_complete([{"role": "user", "content": s["prompt"]}], s["aligned"])


def test_prompts_only_data_skips_the_preference_metrics(quickstart, few_pairs, tmp_path, capsys):
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text(WORDS_SCORER)
    adapter, prompts = str(quickstart / "adapter"), str(few_pairs[1])
    result, html, printed = run_eval([adapter, "--data", prompts, "--max-new-tokens", "8", "--scorer", f"{scorer}:words",
                                      "--out", str(tmp_path / "ev")])
    assert set(result) == TOP_KEYS and result["models"] is None and result["per_pair"] is None
    assert result["data"]["kind"] == "prompts" and result["data"]["pairs"] == 0 and result["data"]["summary"]["kept"] == 3
    assert "prompts only" in result["preference_skipped"]
    assert result["scorer"]["n"] == 3 and all(set(s) == SAMPLE_KEYS | {"sft_score", "aligned_score"}
                                              for s in result["generation"]["samples"])
    wanted = [json.loads(line)["prompt"] for line in few_pairs[1].read_text().splitlines()]
    assert [s["prompt"] for s in result["generation"]["samples"]] == wanted
    assert f"held-out prompts: 3 ({prompts}); preference metrics skipped: the held-out data has prompts only" in printed
    assert "skipped: the held-out data has prompts only" in html and html.count("data:image/png") == 2  # curves, outcomes
    # with nothing asked of the answers, a prompts-only source has nothing to evaluate
    err = _eval_error([adapter, "--data", prompts], capsys)
    assert "has prompts only" in err and "--scorer" in err


def test_bad_scorer_stops_before_the_model_loads(quickstart, few_pairs, tmp_path, capsys, monkeypatch):
    import qsimpo.load

    monkeypatch.setattr(qsimpo.load, "load_adapter", lambda *a, **k: pytest.fail("the model was loaded before the scorer was checked"))
    adapter, pairs = str(quickstart / "adapter"), str(few_pairs[0])
    err = _eval_error([adapter, "--data", pairs, "--scorer", str(tmp_path / "nope.py") + ":f"], capsys)
    assert "--scorer" in err and "no file" in err and "nope.py" in err
    (tmp_path / "s.py").write_text(WORDS_SCORER)
    assert "has no 'wrods'" in _eval_error([adapter, "--data", pairs, "--scorer", f"{tmp_path / 's.py'}:wrods"], capsys)
    assert "does not import" in _eval_error([adapter, "--data", pairs, "--scorer", "no_such_module_x:f"], capsys)
    assert "no such folder" in _eval_error([adapter, "--data", pairs, "--scorer", str(tmp_path / "rm")], capsys)
    base = json.loads((quickstart / "adapter" / "qsimpo.json").read_text())["base_model"]  # a causal LM, no classifier
    assert "is not a sequence classifier" in _eval_error([adapter, "--data", pairs, "--scorer", base], capsys)
