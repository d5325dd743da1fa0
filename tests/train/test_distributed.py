"""Two CPU processes (gloo) train the same adapter as one process on the same global batch.

Each launch runs ``qsimpo train CONFIG`` as users type it, through a wrapper that also saves what
every rank holds when training ends. The two-process runs take the fast path (chunked head with
several chunks per batch, shared-prompt packing), the one-process reference the plain path
(separate chosen and rejected rows, full logits), so a match also shows that the fast path gives
the same numbers when sharded. All use LoRA on the NF4 base, length-grouped batches, dropout 0 and
one seed; the reference takes batch_size 4 where each process takes 2, with gradient accumulation
2, so every optimizer step sees the same 8 pairs. With 60 pairs the length-grouped mega-batches
depend on the batch size they are cut for, so a sampler sized per process would be caught.
Launches: DDP under ``accelerate launch`` with the shipped ``configs/accelerate/ddp.yaml``, FSDP2
full shard under torchrun (``--train.fsdp true``), and FSDP2 under ``accelerate launch`` with the
shipped ``configs/accelerate/fsdp-qlora.yaml`` on a model whose output head is tied to its input
embeddings. (tests/test_train.py runs DDP under torchrun.) `qsimpo sft` runs under torchrun with DDP and FSDP,
and `qsimpo train --model.sft_adapter` with DDP and FSDP, against one-process references of their own (see below).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, make_config

pytestmark = pytest.mark.usefixtures("processes")  # every test here starts processes: integration tier

COMMON = ("--data.max_rows", "60", "--train.max_steps", "3", "--train.gradient_accumulation_steps", "2",
          "--train.head_chunk_size", "16", "--train.save_steps", "1000")
# Measured: logged numbers differ by at most 3e-7 and LoRA weights by 2e-6 (fp32 sums in another
# order, which AdamW's first steps amplify where a gradient is near 0). A step moves the weights by
# about 1e-2 (lr); a sampler sized per process already fails on step 1's loss.
LOSS_TOL = dict(rtol=0, atol=2e-6)
WEIGHT_TOL = dict(rtol=0, atol=1e-5)

RANK_DUMP = textwrap.dedent("""
    import os, sys
    import torch
    import qsimpo.train.recipe as recipe
    from qsimpo.cli import main

    def train_and_dump(cfg, train=recipe.train, **kwargs):
        import bitsandbytes as bnb
        from torch.distributed.tensor import DTensor

        run = train(cfg, **kwargs)
        model = run.trainer.model
        params = {}
        for name, p in model.named_parameters():  # full_tensor() is a collective: same order on every rank
            sharded = isinstance(p, DTensor)
            local = p.to_local() if sharded else p
            entry = {"sharded": sharded, "numel": p.numel(), "local_numel": local.numel()}
            if "lora_" in name:
                entry["local"] = local.detach().clone()
                entry["full"] = (p.full_tensor() if sharded else p).detach().clone()
            params[name] = entry
        n4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        ref = getattr(run.trainer.train_dataset, "reference", None)  # DPO: the reference log-probs this rank trained with
        ref = ref and {"computed": ref.computed, "chosen": ref.chosen, "rejected": ref.rejected, "path": str(ref.path)}
        torch.save({"params": params, "linear4bit": n4bit, "world_size": int(os.environ["WORLD_SIZE"]), "reference": ref},
                   os.path.join(cfg.train.output_dir, f"rank{os.environ['RANK']}.pt"))
        return run

    recipe.train = train_and_dump
    sys.exit(main(["train", *sys.argv[1:]]))
""")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def tied_base(tiny_base, tmp_path_factory):
    """tiny_base with its output head tied to the input embeddings (as in SmolLM2, Gemma, small Qwen2.5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied") / "tiny"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(tiny_base, tied_base, pref_jsonl, tmp_path_factory):
    """(wrapper script, prepare): prepare(base) gives (config YAML, one-process reference folder), made once."""
    from qsimpo.config import dump_yaml
    from qsimpo.train.recipe import train

    root = tmp_path_factory.mktemp("dist")
    script = root / "train_and_dump.py"
    script.write_text(RANK_DUMP)
    bases, made = {"untied": tiny_base, "tied": tied_base}, {}

    def prepare(which: str):
        if which not in made:
            config = root / f"{which}.yaml"
            config.write_text(dump_yaml(make_config(bases[which], pref_jsonl, root / "unused", *COMMON)))
            plain = ("--train.batch_size", "4", "--train.packing", "none", "--train.head_chunk_size", "0")
            reference = train(make_config(bases[which], pref_jsonl, root / f"one-{which}", *COMMON, *plain)).output_dir
            made[which] = config, reference
        return made[which]

    return script, prepare


def launch(launcher: list[str], script, config, out, *extra: str, env: dict | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", *launcher, str(script), str(config), "--train.output_dir", str(out),
           "--train.batch_size", "2", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:]


def torchrun() -> list[str]:
    return ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]


def accelerate_launch(config_name: str) -> list[str]:
    config = ROOT / "configs" / "accelerate" / config_name
    return ["accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
            "--num_processes", "2", "--main_process_port", free_port()]


def logged(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_matches_reference(out, reference) -> dict[str, dict]:
    """Logged numbers and the saved adapter agree with the one-process run; returns each rank's dump."""
    steps, ref_steps = logged(out), logged(reference)
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == [1, 2, 3]
    for row, ref in zip(steps, ref_steps):
        for key in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins"):
            torch.testing.assert_close(torch.tensor(row[key]), torch.tensor(ref[key]), **LOSS_TOL,
                                       msg=f"step {row['step']} {key}")
        assert row["rewards/accuracies"] == ref["rewards/accuracies"]
    adapter = load_file(out / "adapter_model.safetensors")
    ref_adapter = load_file(reference / "adapter_model.safetensors")
    assert adapter.keys() == ref_adapter.keys() and len(adapter) == 28  # 7 linears x 2 layers x (A, B)
    for k in adapter:
        torch.testing.assert_close(adapter[k], ref_adapter[k], **WEIGHT_TOL, msg=k)
        if "lora_B" in k:  # B starts at zero: training moved it
            assert ref_adapter[k].abs().sum() > 0, k
    assert json.loads((out / "qsimpo.json").read_text())["global_step"] == 3

    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert all(d["world_size"] == 2 and d["linear4bit"] == 14 for d in ranks)  # LoRA on the 4-bit base
    saved = {k.removesuffix(".weight"): v for k, v in adapter.items()}
    for d in ranks:
        lora = {k.replace(".default", "").removesuffix(".weight"): v for k, v in d["params"].items() if "lora_" in k}
        assert lora.keys() == saved.keys()
        for k, v in lora.items():  # every rank ends with the adapter that was written
            assert torch.equal(v["full"], saved[k]), f"rank holds another {k} than the saved adapter"
    return ranks


def assert_sharded_in_two(ranks) -> None:
    for name, p in ranks[0]["params"].items():
        # every weight, the packed 4-bit ones and the output head included, is split in two
        assert p["sharded"] and p["local_numel"] * 2 == p["numel"], name
        if "lora_" in name:  # rank 0 holds the first half of each LoRA matrix's rows, rank 1 the rest
            full, half = p["full"], p["full"].shape[0] // 2
            assert torch.equal(p["local"], full[:half]), name
            assert torch.equal(ranks[1]["params"][name]["local"], full[half:]), name


def test_ddp_under_accelerate_launch_matches_one_process(setup, tmp_path):
    script, prepare = setup
    config, reference = prepare("untied")
    launch(accelerate_launch("ddp.yaml"), script, config, tmp_path / "ddp")
    for d in assert_matches_reference(tmp_path / "ddp", reference):
        assert not any(p["sharded"] for p in d["params"].values())  # every process holds the whole model


def test_fsdp_under_torchrun_matches_one_process(setup, tmp_path):
    script, prepare = setup
    config, reference = prepare("untied")
    launch(torchrun(), script, config, tmp_path / "fsdp", "--train.fsdp", "true")
    ranks = assert_matches_reference(tmp_path / "fsdp", reference)
    assert_sharded_in_two(ranks)
    assert ranks[0]["params"]["base_model.model.lm_head.weight"]["sharded"]  # the chunked head's weight too


def test_fsdp_under_accelerate_launch_with_a_tied_head_matches_one_process(setup, tmp_path):
    """accelerate puts a tied head in one FSDP unit with the embeddings and the final norm."""
    script, prepare = setup
    config, reference = prepare("tied")
    launch(accelerate_launch("fsdp-qlora.yaml"), script, config, tmp_path / "fsdp")
    ranks = assert_matches_reference(tmp_path / "fsdp", reference)
    assert_sharded_in_two(ranks)
    assert not any("lm_head" in name for name in ranks[0]["params"])  # one shared weight, listed once


def test_dpo_under_torchrun_computes_the_reference_once_for_every_rank(setup, tiny_base, pref_jsonl, tmp_path):
    """DDP under torchrun with loss.type dpo: process 0 computes the reference log-probs and stores them, process 1
    reads the same file back, both train with the same numbers, and the run matches one process (which computed
    them with the plain path: unpacked rows, full logits)."""
    from qsimpo.config import dump_yaml
    from qsimpo.train.recipe import train

    script, _ = setup
    dpo = ("--loss.type", "dpo")
    config = tmp_path / "dpo.yaml"
    config.write_text(dump_yaml(make_config(tiny_base, pref_jsonl, tmp_path / "unused", *COMMON, *dpo)))
    plain = ("--train.batch_size", "4", "--train.packing", "none", "--train.head_chunk_size", "0")
    one = train(make_config(tiny_base, pref_jsonl, tmp_path / "one", *COMMON, *plain, *dpo))
    # a datasets cache of its own: the launched run must not read back the reference the run above stored
    launch(torchrun(), script, config, tmp_path / "ddp", env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")})
    ranks = assert_matches_reference(tmp_path / "ddp", one.output_dir)
    refs = [d["reference"] for d in ranks]
    assert [r["computed"] for r in refs] == [True, False]  # computed once, by process 0; process 1 read it back
    assert refs[0]["path"] == refs[1]["path"] and str(tmp_path / "datasets") in refs[0]["path"]
    assert refs[0]["chosen"] == refs[1]["chosen"] and refs[0]["rejected"] == refs[1]["rejected"]
    expected = one.trainer.train_dataset.reference
    assert len(refs[0]["chosen"]) == len(expected.chosen) == 60
    torch.testing.assert_close(torch.tensor(refs[0]["chosen"]), torch.tensor(expected.chosen), rtol=0, atol=5e-5)
    torch.testing.assert_close(torch.tensor(refs[0]["rejected"]), torch.tensor(expected.rejected), rtol=0, atol=5e-5)
    meta = json.loads((tmp_path / "ddp" / "qsimpo.json").read_text())
    assert meta["reference"]["train"]["computed"] is True and meta["reference"]["train"]["pairs"] == 60


def test_fsdp_refused_for_one_process(tiny_base, pref_jsonl, tmp_path):
    from qsimpo.config import ConfigError
    from qsimpo.train.recipe import train

    with pytest.raises(ConfigError, match="train.fsdp = true shards across processes.*torchrun --nproc_per_node"):
        train(make_config(tiny_base, pref_jsonl, tmp_path / "run", "--train.fsdp", "true"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp-qlora.yaml", "zero3.yaml"])
def test_shipped_accelerate_configs(name):
    """accelerate's own loader reads each file, with the settings qsimpo relies on."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = ROOT / "configs" / "accelerate" / name
    assert path.read_text().startswith(f"# accelerate launch --config_file configs/accelerate/{name}")
    cfg = load_config_from_file(str(path))
    assert cfg.mixed_precision == "no" and not cfg.use_cpu and cfg.num_machines == 1  # precision is qsimpo's
    if name == "ddp.yaml":
        assert cfg.distributed_type == DistributedType.MULTI_GPU and not cfg.fsdp_config and not cfg.deepspeed_config
    elif name == "fsdp-qlora.yaml":
        f = cfg.fsdp_config
        assert cfg.distributed_type == DistributedType.FSDP and f["fsdp_version"] == 2
        assert f["fsdp_reshard_after_forward"] is True and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # else Trainer.save_model writes no adapter
        assert f["fsdp_activation_checkpointing"] is False  # layers are checkpointed by qsimpo (add_lora)
    else:
        d = cfg.deepspeed_config
        assert cfg.distributed_type == DistributedType.DEEPSPEED and d["zero_stage"] == 3
        assert d["zero3_init_flag"] is False and d["zero3_save_16bit_model"] is True


def test_an_error_under_torchrun_is_said_once(tmp_path):
    """Every rank meets the same bad config; the user reads its message once (rank 0), with each rank's exit code 2.
    Rank 0 starts 3 s late here: the launcher stops every rank once one exits, so a rank 1 that exited at once
    would have rank 0 stopped before it said anything, and the user would read no error at all."""
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  name_or_path: m\ndata:\n  path: d.jsonl\nlora:\n  alhpa: 8\n")
    late = tmp_path / "late"
    late.mkdir()
    (late / "sitecustomize.py").write_text("import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(3)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(late), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", *torchrun(), "-m", "qsimpo", "train", str(config)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: invalid config") == 1, proc.stderr[-3000:]
    assert "did you mean lora.alpha?" in proc.stderr


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_accelerate_still_keeps_fsdp_on_cpu_where_qsimpo_sets_it(fresh_accelerate_state):
    """enable_fsdp_on_cpu writes accelerate's private PartialState._shared_state: this fails when accelerate changes it.

    In one process (distributed_type NO where torchrun gives MULTI_CPU: the same path) it checks what the FSDP
    launches above rely on: the shared state exists and carries distributed_type; a later AcceleratorState()
    copies it from there (so the write is needed); the Accelerator's FSDP checks read the state it sets; and
    AcceleratorState still turns FSDP on for accelerator devices only (when it no longer does, accelerate may
    do this itself: try the launches without enable_fsdp_on_cpu).
    """
    import inspect
    import types

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from qsimpo.train.trainer import enable_fsdp_on_cpu

    accelerator = Accelerator(cpu=True)
    assert PartialState._shared_state["distributed_type"] == accelerator.distributed_type == DistributedType.NO
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2}), is_fsdp_enabled=False)
    enable_fsdp_on_cpu(trainer, accelerator.state)

    assert trainer.is_fsdp_enabled and accelerator.state.fsdp_plugin.fsdp_version == 2
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2  # what Accelerator.prepare reads
    assert AcceleratorState().distributed_type == PartialState().distributed_type == DistributedType.FSDP
    assert AcceleratorState().fsdp_plugin is accelerator.state.fsdp_plugin

    PartialState._shared_state["distributed_type"] = DistributedType.NO  # without the write to PartialState ...
    assert AcceleratorState().distributed_type == DistributedType.NO  # ... the next AcceleratorState() drops FSDP

    assert "self.is_fsdp2" in inspect.getsource(Accelerator.prepare_model)
    assert "DistributedType.MULTI_CPU" not in inspect.getsource(AcceleratorState.__init__)


# ------------------------------------------------------------------------- qsimpo sft, and SimPO on its adapter
# The SFT loss is a mean over every assistant token of an optimizer step (all micro-batches, all processes), so
# the one-process reference (batch 2, accumulation 4) and the two processes (batch 2, accumulation 2 each) average
# the same tokens; the length-grouped sampler is cut for 8 packed rows a step either way. (That a packed row scores
# its conversations as each alone is tests/train/test_sft.py's.)
SFT_COMMON = ("--data.max_rows", "60", "--train.max_steps", "3", "--train.head_chunk_size", "16",
              "--train.save_steps", "1000", "--data.max_length", "256", "--data.eval", "0.1")


@pytest.fixture(scope="module")
def sft_setup(tiny_base, pref_rows, tmp_path_factory):
    """(config YAML, one-process SFT reference): two-turn conversations, both assistant turns trained."""
    from qsimpo.config import dump_yaml
    from qsimpo.train.sft import sft

    root = tmp_path_factory.mktemp("dist-sft")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]},
        {"role": "user", "content": "Again?"}, {"role": "assistant", "content": r["rejected"]}]}) + "\n" for r in pref_rows))
    config = root / "sft.yaml"
    config.write_text(dump_yaml(make_config(tiny_base, data, root / "unused", *SFT_COMMON)))
    plain = ("--train.batch_size", "2", "--train.gradient_accumulation_steps", "4", "--train.head_chunk_size", "0")
    return config, sft(make_config(tiny_base, data, root / "one", *SFT_COMMON, *plain)).output_dir


def assert_same_run(out, reference, keys=("loss", "grad_norm")) -> None:
    steps, ref_steps = logged(out), logged(reference)
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == [1, 2, 3]
    for row, ref in zip(steps, ref_steps):
        for key in keys:
            torch.testing.assert_close(torch.tensor(row[key]), torch.tensor(ref[key]), **LOSS_TOL,
                                       msg=f"step {row['step']} {key}")
    adapter, ref_adapter = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert adapter.keys() == ref_adapter.keys() and len(adapter) == 28
    for k in adapter:
        torch.testing.assert_close(adapter[k], ref_adapter[k], **WEIGHT_TOL, msg=k)
        if "lora_B" in k:
            assert ref_adapter[k].abs().sum() > 0, k


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_sft_under_torchrun_matches_one_process(sft_setup, tmp_path, fsdp):
    """`torchrun ... -m qsimpo sft CONFIG` as a user types it: packed rows and the chunked head on two processes give
    the one-process run's losses, gradient norms and adapter (full-vocabulary logits there)."""
    config, reference = sft_setup
    launch([*torchrun(), "-m", "qsimpo"], "sft", config, tmp_path / "sft", "--train.gradient_accumulation_steps", "2",
           *(("--train.fsdp", "true") if fsdp else ()))
    assert_same_run(tmp_path / "sft", reference)
    meta = json.loads((tmp_path / "sft" / "qsimpo.json").read_text())
    assert meta["kind"] == "sft" and meta["global_step"] == 3
    # the end-of-turn check (the base's side before training, the SFT model's after it, where FSDP gathers in its
    # forward) runs on every process and finds what the one-process run found on the same held-out conversations
    ref_check, check = (json.loads((d / "qsimpo.json").read_text())["data"]["turn_end"] for d in (reference, tmp_path / "sft"))
    assert check["turns"] == ref_check["turns"] > 0 and check["base"] == pytest.approx(ref_check["base"], abs=1e-3)
    assert check["sft"]["mean_logprob"] == pytest.approx(ref_check["sft"]["mean_logprob"], abs=1e-3)
    for key in ("median_rank", "first", "stops"):  # counts: one near-tie may fall the other way in float noise
        assert abs(check["sft"][key] - ref_check["sft"][key]) <= 1, (key, check["sft"], ref_check["sft"])


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_simpo_on_an_sft_adapter_under_torchrun_matches_one_process(sft_setup, tiny_base, pref_jsonl, tmp_path, fsdp):
    """`torchrun ... -m qsimpo train CONFIG --model.sft_adapter DIR` (DDP, and FSDP2 with the frozen SFT adapter
    sharded beside the trained one): the SFT adapter frozen on every rank, the stacked adapter the one-process run
    writes."""
    from qsimpo.config import dump_yaml
    from qsimpo.train.recipe import train

    config = tmp_path / "simpo.yaml"
    config.write_text(dump_yaml(make_config(tiny_base, pref_jsonl, tmp_path / "unused", *COMMON)))
    sft_adapter = sft_setup[1]
    plain = ("--train.batch_size", "4", "--train.packing", "none", "--train.head_chunk_size", "0")
    reference = train(make_config(tiny_base, pref_jsonl, tmp_path / "one", *COMMON, *plain,
                                  "--model.sft_adapter", str(sft_adapter))).output_dir
    launch([*torchrun(), "-m", "qsimpo"], "train", config, tmp_path / "ddp", "--model.sft_adapter", str(sft_adapter),
           *(("--train.fsdp", "true") if fsdp else ()))
    out = tmp_path / "ddp"
    assert_same_run(out, reference, keys=("loss", "grad_norm", "logps/chosen", "logps/rejected"))
    sft_in, sft_kept = load_file(sft_adapter / "adapter_model.safetensors"), load_file(out / "sft" / "adapter_model.safetensors")
    assert all(torch.equal(sft_in[k], sft_kept[k]) for k in sft_in)  # frozen on both ranks
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # SFT 4 + SimPO 4, concatenated
