"""`qsimpo eval A B C`: several adapters on one tiny base in one eval.json, each adapter's numbers those of its own eval."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch

from qsimpo.cli import main

WORDS_SCORER = "def words(prompt, response):\n    return len(response.split())\n"


@pytest.fixture(scope="module")
def zero_adapter(tiny_base, tmp_path_factory):
    """A fresh LoRA (B = 0, peft's init): the model it makes is the base's, so its KL from SFT is 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("zero") / "zero"
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    model.save_pretrained(out)
    (out / "qsimpo.json").write_text(json.dumps({"base_model": str(tiny_base), "quantization": "nf4",
                                                 "loss": {"type": "dpo", "beta": 0.1, "label_smoothing": 0.0}}))
    return out


def run(argv: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["eval", *argv])
    return rc, printed.getvalue()


@pytest.fixture(scope="module")
def compared(tiny_adapters, zero_adapter, pref_jsonl, tmp_path_factory, one_thread):
    """(the comparison's eval.json, what it printed, the score() calls it made, each adapter's own eval.json)."""
    import qsimpo.eval.evaluate as E

    tmp = tmp_path_factory.mktemp("compare")
    scorer = tmp / "words.py"
    scorer.write_text(WORDS_SCORER)
    common = ["--data", str(pref_jsonl), "--max-rows", "6", "--generate", "3", "--max-new-tokens", "6",
              "--scorer", f"{scorer}:words"]
    adapters = [*map(str, tiny_adapters), str(zero_adapter)]
    calls = []
    real = E.score
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "score", lambda model, pairs, pad, bs, desc: calls.append(desc) or real(model, pairs, pad, bs, desc))
        rc, printed = run([*adapters, *common, "--out", str(tmp / "all")])
    assert rc == 0
    alone = []
    for i, a in enumerate(adapters):
        assert run([a, *common, "--out", str(tmp / f"alone{i}")])[0] == 0
        alone.append(json.loads((tmp / f"alone{i}" / "eval.json").read_text()))
    return json.loads((tmp / "all" / "eval.json").read_text()), printed, calls, alone, tmp


def test_one_report_with_every_adapter_and_the_sft_model_scored_once(compared):
    result, printed, calls, _, tmp = compared
    names = [a["name"] for a in result["adapters"]]
    assert names == ["aligned", "other", "zero"] and result["kind"] == "comparison"
    assert calls == ["scoring SFT", "scoring aligned", "scoring other", "scoring zero"]  # SFT once, each adapter once
    assert [a["loss"]["type"] for a in result["adapters"]] == ["simpo", "simpo", "dpo"]  # from qsimpo.json
    assert set(result["shared"]["models"]) == {"sft", *names}
    assert result["shared"]["definition"].startswith("a pair counts as right when the chosen response has the higher "
                                                     "average log-prob")
    assert list(result["generation"]["models"]) == ["sft", *names]
    assert all(set(s["answers"]) == {"sft", *names} for s in result["generation"]["samples"])
    html = (tmp / "all" / "report.html").read_text()
    assert "aligned (simpo)" in html and "zero (dpo)" in html and "KL from SFT" in html and "data:image/png;base64," in html
    assert "KL from SFT per response token" in printed and "zero vs SFT: win rate" in printed
    assert "aligned vs other: win rate" in printed


def test_each_adapter_s_numbers_are_those_of_its_own_eval(compared):
    """The multi path scores, answers and judges exactly as `qsimpo eval` of each adapter alone."""
    result, _, _, alone, _ = compared
    sft_cols = {k: v for k, v in alone[0]["per_pair"].items() if not k.startswith("aligned_")}
    assert {k: result["per_pair"][k] for k in sft_cols} == sft_cols
    by_model = {(c["model"], c["against"]): c for c in result["scorer"]["comparisons"]}
    back = {"model": "aligned", "against": "sft"}
    for entry, single in zip(result["adapters"], alone):
        name = entry["name"]
        assert entry["models"] == single["models"]  # every number, at the adapter's own β, γ
        assert entry["simpo"] == single["simpo"]
        for side in ("chosen", "rejected"):
            assert result["per_pair"][f"{name}_logp_{side}"] == single["per_pair"][f"aligned_logp_{side}"]
        assert [s["answers"][name] for s in result["generation"]["samples"]] == \
               [s["aligned"] for s in single["generation"]["samples"]]
        assert [s["answers"]["sft"] for s in result["generation"]["samples"]] == \
               [s["sft"] for s in single["generation"]["samples"]]
        assert result["generation"]["models"][name] == single["generation"]["aligned"]
        c = by_model[(name, "sft")]
        mine = {k: ({back[n]: x for n, x in v.items()} if isinstance(v, dict) else v) for k, v in c.items()
                if k not in ("model", "against")}
        theirs = {k: v for k, v in single["scorer"].items() if k not in ("spec", "kind", "temperature", "judge_cut")}
        assert mine == theirs


def test_pairwise_win_rates_between_adapters(compared):
    from qsimpo.eval import metrics as M

    result = compared[0]
    samples = result["generation"]["samples"]
    pairs = [(c["model"], c["against"]) for c in result["scorer"]["comparisons"]]
    assert pairs == [("aligned", "sft"), ("other", "sft"), ("zero", "sft"), ("aligned", "other"), ("aligned", "zero"),
                     ("other", "zero")]
    for c in result["scorer"]["comparisons"]:
        a, b = ([s["scores"][n] for s in samples] for n in (c["model"], c["against"]))
        assert c["win_rate"] == M.win_rate(a, b)["win_rate"] and c["mean_score"]["model"] == sum(a) / len(a)
        assert c["win_rate_ci"][0] <= c["win_rate"] <= c["win_rate_ci"][1]
        assert 0 <= c["lc_win_rate_ci"][0] <= c["lc_win_rate_ci"][1] <= 1


def test_kl_from_sft_is_zero_for_a_zero_adapter_and_positive_otherwise(compared):
    kl = {a["name"]: a["kl_from_sft"] for a in compared[0]["adapters"]}
    assert kl["zero"]["per_token"] == pytest.approx(0, abs=1e-6)
    assert kl["aligned"]["per_token"] > 1e-3 and kl["other"]["per_token"] > 1e-3
    tokens = compared[0]["per_pair"]["chosen_len"] + compared[0]["per_pair"]["rejected_len"]
    assert kl["aligned"]["tokens"] == sum(tokens)
    # the zero adapter's model is the SFT model: its shared numbers are SFT's
    shared = compared[0]["shared"]["models"]
    assert shared["zero"]["reward_accuracy"] == shared["sft"]["reward_accuracy"]


def test_default_out_and_the_same_adapter_twice(tiny_adapters, capsys):
    a, b = map(str, tiny_adapters)
    assert main(["eval", a, b, "--data", a, "--dry-run"]) == 0
    assert str(tiny_adapters[0].parent / "eval-aligned-vs-other") in capsys.readouterr().out
    assert main(["eval", a, a, "--data", a, "--dry-run"]) == 2
    assert f"adapter {a} is given twice" in capsys.readouterr().err


def _copy(adapter, folder, **meta):
    shutil.copytree(adapter, folder)
    record = json.loads((folder / "qsimpo.json").read_text())
    (folder / "qsimpo.json").write_text(json.dumps({**record, **meta}))
    return folder


def test_adapters_on_different_bases_or_sft_models_are_refused(tiny_adapters, pref_jsonl, tmp_path, capsys):
    a, b = tiny_adapters
    elsewhere = _copy(b, tmp_path / "elsewhere", base_model=str(tmp_path))
    code = main(["eval", str(a), str(elsewhere), "--data", str(pref_jsonl), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"the adapters are on different bases: aligned on {json.loads((a / 'qsimpo.json').read_text())['base_model']}, " \
           f"elsewhere on {tmp_path}" in err
    stacked = _copy(b, tmp_path / "stacked", sft_adapter={"subfolder": "sft", "source": "adapters/sft"})
    shutil.copytree(a, stacked / "sft")
    code = main(["eval", str(a), str(stacked), "--data", str(pref_jsonl), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("aligned's is the base alone, stacked's is the base with the SFT adapter adapters/sft; the adapters of one "
            "eval must share their SFT model") in err
    assert not (tmp_path / "out").exists()


def test_prompts_only_data_compares_the_answers(tiny_adapters, pref_rows, tmp_path, one_thread):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in pref_rows[:2]))
    rc, printed = run([*map(str, tiny_adapters), "--data", str(prompts), "--generate", "2", "--max-new-tokens", "3",
                       "--out", str(tmp_path / "out")])
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert rc == 0 and result["shared"] is None and result["per_pair"] is None and result["data"]["kind"] == "prompts"
    assert result["preference_skipped"].startswith("the held-out data has prompts only")
    assert [list(s["answers"]) for s in result["generation"]["samples"]] == [["sft", "aligned", "other"]] * 2
    assert "preference metrics skipped" in printed
