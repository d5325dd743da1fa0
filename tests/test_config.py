"""Config schema: shipped configs load, overrides apply, every problem is reported at once."""

from pathlib import Path

import pytest
import yaml

from qsimpo.cli import main
from qsimpo.config import ConfigError, build, dump_yaml, load_config
from qsimpo.config_docs import field_docs

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "qsimpo" / "quickstart").glob("*.yaml"))
FILL = ["--model.name_or_path", "some/model", "--data.path", "some.jsonl"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path, FILL)  # fills the blanks the quickstart/user fills in
    raw = yaml.safe_load(path.read_text())
    assert cfg.simpo.beta == raw.get("simpo", {}).get("beta", 2.0)  # `qsimpo sft` presets have no simpo section
    assert path.read_text().startswith("# qsimpo") or path.parent.name == "quickstart"  # configs open with their command


def test_paper_presets():
    def gamma(name):
        return load_config(ROOT / "configs" / f"{name}.yaml").simpo

    assert gamma("llama3-8b-instruct").resolved_gamma == pytest.approx(2.5 * 0.55)
    assert gamma("mistral-7b-instruct").resolved_gamma == pytest.approx(0.25)
    assert gamma("gemma2-9b-it").resolved_gamma == pytest.approx(5.0)
    # the Base setting: SimPO on top of `qsimpo sft`
    assert gamma("mistral-7b-base-simpo").resolved_gamma == pytest.approx(2.0 * 0.8)
    assert gamma("llama3-8b-base-simpo").resolved_gamma == pytest.approx(2.0 * 0.5)
    for name, lr in (("mistral-7b-base-simpo", 3e-7), ("llama3-8b-base-simpo", 6e-7)):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.train.learning_rate == lr and cfg.simpo.beta == 2.0 and cfg.model.sft_adapter


def test_quickstart_configs_agree():
    shipped = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    template = yaml.safe_load((ROOT / "qsimpo" / "quickstart" / "smollm2.yaml").read_text())
    for section, values in template.items():
        for key, value in values.items():
            assert shipped[section][key] == value, f"{section}.{key} differs"


def test_overrides_are_typed():
    cfg = load_config(None, FILL + ["--data.max_length", "256", "--train.learning_rate=3e-5", "--lora.target_modules", "[q_proj, v_proj]",
                                    "--train.gradient_checkpointing", "false", "--simpo.gamma", "1"])
    assert cfg.data.max_length == 256 and cfg.train.learning_rate == 3e-5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.gradient_checkpointing is False and cfg.simpo.gamma == 1.0


def test_values_are_taken_as_written():
    cfg = build({"model": {"name_or_path": "m", "revision": "20240101"}, "data": {"path": "d", "eval": 0.05},
                 "lora": {"alpha": 16}, "train": {"learning_rate": 1e-5}})
    assert cfg.model.revision == "20240101" and cfg.data.eval_fraction == 0.05
    assert cfg.lora.alpha == 16 and cfg.train.learning_rate == 1e-5
    with pytest.raises(ConfigError) as e:
        build({"model": {"name_or_path": "m", "revision": 1.10, "trust_remote_code": "yes"},
               "data": {"path": "d", "max_length": "256"}, "lora": {"r": 4.5, "target_modules": {"q": 1}},
               "train": {"max_steps": 0, "save_total_limit": 0, "batch_size": True, "report_to": ["wandb", None]},
               "simpo": {"label_smoothing": 0.5, "beta": True}, "model ": 3, 1: {}, "optim": {None: 1}})
    assert e.value.problems == [
        "unknown section 1: valid sections are model, lora, data, loss, simpo, dpo, orpo, cpo, arpo, train",
        "model.revision = 1.1 has the wrong type: expected str | null (quote it to keep it as text)",
        "model.trust_remote_code = 'yes' has the wrong type: expected bool",  # a security switch: true or false only
        "lora.r = 4.5 has the wrong type: expected int",
        "lora.target_modules = {'q': 1} has the wrong type: expected list[str] | str",
        "data.max_length = '256' has the wrong type: expected int",
        "simpo.beta = True has the wrong type: expected float",
        "simpo.label_smoothing = 0.5 must be < 0.5",
        "train.batch_size = True has the wrong type: expected int",
        "train.save_total_limit = 0 must be >= 1 (or null to keep all)",
        "train.report_to = ['wandb', None] has the wrong type: expected list[str] | str",
        "unknown section 'model ': valid sections are model, lora, data, loss, simpo, dpo, orpo, cpo, arpo, train",
        "unknown section 'optim': valid sections are model, lora, data, loss, simpo, dpo, orpo, cpo, arpo, train",
        "train.max_steps = 0 must be > 0, or -1 to use num_epochs",
    ]
    with pytest.raises(ConfigError, match=r"unknown key lora.1: keys are field names"):
        build({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "lora": {1: 2}})


def test_yaml_and_command_line_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: m\n  revision: main\ndata:\n  path: d\ntrain:\n  learning_rate: 1e-5\n")
    assert load_config(path).train.learning_rate == 1e-5  # YAML 1.1 reads 1e-5 as text; configs mean a number
    cfg = load_config(path, ["--model.revision", "0123", "--train.output_dir", "2024", "--data.eval", "0.05",
                             "--train.learning_rate", "3e-5"])
    assert cfg.model.revision == "0123" and cfg.train.output_dir == "2024"  # text fields keep the text as typed
    assert cfg.data.eval_fraction == 0.05 and cfg.train.learning_rate == 3e-5


def test_gamma_conversion():
    assert build({"model": {"name_or_path": "m"}, "data": {"path": "d"}}).simpo.resolved_gamma == 1.0  # default ratio 0.5 × β 2
    assert build({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "simpo": {"beta": 10, "gamma_beta_ratio": 0.3}}).simpo.resolved_gamma == pytest.approx(3.0)
    assert build({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "simpo": {"gamma": 0.7}}).simpo.resolved_gamma == 0.7


def test_all_problems_reported_at_once():
    raw = {
        "model": {"name_or_path": "m", "quantisation": "nf4"},
        "data": {"path": "d", "max_length": 128, "max_prompt_length": 128},
        "simpo": {"beta": 0, "gamma": 1.0, "gamma_beta_ratio": 0.5},
        "train": {"learning_rate": -1, "batch_size": "two"},
        "optimizer": {},
    }
    with pytest.raises(ConfigError) as e:
        build(raw, "x.yaml")
    msg = str(e.value)
    for needle in [
        "unknown key model.quantisation (did you mean model.quantization?)",
        "data.max_prompt_length = 128 must be < data.max_length = 128",
        "simpo.beta = 0 must be > 0 (the paper uses 2.0 to 10)",
        "both set: choose one",
        "train.learning_rate = -1 must be > 0",
        "train.batch_size = 'two' has the wrong type: expected int",
        "unknown section 'optimizer'",
        "x.yaml",
    ]:
        assert needle in msg, needle
    assert len(e.value.problems) == 7


@pytest.mark.parametrize("override, needle", [
    (["--simpo.gamma", "-1"], "simpo.gamma = -1 must be >= 0 (a target margin)"),
    (["--model.quantization", "nf3"], "model.quantization = 'nf3' is not one of nf4, int8, none"),
    (["--data.on_bad_row", "ignore"], "data.on_bad_row = 'ignore' is not one of error, skip"),
    (["--lora.r", "0"], "lora.r = 0 must be > 0 (8 to 64 is typical)"),
    (["--data.max_length"], "--data.max_length needs a value"),
    (["oops"], "unexpected argument 'oops'"),
])
def test_cli_errors(override, needle, capsys):
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml")] + override) == 2
    assert needle in capsys.readouterr().err


def test_help_shows_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for name, _, _, doc in field_docs():
        assert f"--{name}" in out and doc[:40] in out
    assert "--lora.dropout (float, >= 0, < 1, default 0.05)" in out  # bounds come from the schema


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.yaml")


def test_docs_config_reference_is_generated_from_the_schema():
    from qsimpo.config_docs import markdown_reference

    text = (ROOT / "docs" / "config.md").read_text()
    assert text == markdown_reference(), "docs/config.md is stale: run python -m qsimpo.config_docs > docs/config.md"
    assert all(f"`{name}`" in text for name, *_ in field_docs())


def test_packing_needs_an_attention_kernel_that_takes_its_mask():
    with pytest.raises(ConfigError, match="model.attn_implementation = 'flash_attention_2' cannot take the shared-prompt mask"):
        load_config(None, ["--model.name_or_path", "m", "--data.path", "d.jsonl",
                           "--model.attn_implementation", "flash_attention_2"])
    cfg = load_config(None, ["--model.name_or_path", "m", "--data.path", "d.jsonl",
                             "--model.attn_implementation", "flash_attention_2", "--train.packing", "none"])
    assert cfg.model.attn_implementation == "flash_attention_2"


def test_validation_never_fills_in_the_config():
    """max_prompt_length None stays None: its default (max_length // 2) is derived where it is read, DataConfig.prompt_limit."""
    import copy

    from qsimpo.config import validate

    cfg = load_config(None, FILL + ["--data.max_length", "64"])  # load_config validates it
    assert cfg.data.max_prompt_length is None and cfg.data.prompt_limit == 32
    before = copy.deepcopy(cfg)
    assert validate(cfg) == [] and cfg == before
    assert load_config(None, FILL + ["--data.max_prompt_length", "40"]).data.prompt_limit == 40
    with pytest.raises(ConfigError, match="data.max_prompt_length = 64 must be < data.max_length = 64"):
        load_config(None, FILL + ["--data.max_length", "64", "--data.max_prompt_length", "64"])


def test_a_data_config_built_in_python_cuts_a_long_pair(tmp_path):
    """DataConfig(max_length=..) never passes through validate: its max_prompt_length stays None, and a pair
    that must be cut is cut at max_length // 2 prompt tokens (it once reached the tokenizer as None: a TypeError)."""
    import json

    from qsimpo.config import DataConfig
    from qsimpo.data import build_dataset
    from qsimpo.quickstart.toy import build_tokenizer

    prompt = " ".join(f"The number {i} is a word." for i in range(30))
    row = {"prompt": prompt, "chosen": "A kind answer of a few words.", "rejected": "No."}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    tok = build_tokenizer([prompt, row["chosen"], row["rejected"]] * 20, chat_template=False)
    cfg = DataConfig(path=str(path), max_length=32)
    assert cfg.max_prompt_length is None
    pairs, summary = build_dataset(cfg, tok)
    assert summary.kept == 1 and summary.truncated_prompt == 1
    assert len(pairs[0]["prompt_ids"]) == 16  # max_length // 2
    assert cfg.max_prompt_length is None


def test_loss_sections_defaults_and_errors_naming_the_loss():
    base = {"model": {"name_or_path": "m"}, "data": {"path": "d"}}
    cfg = build(base)
    assert cfg.loss.type == "simpo"  # the default, and every shipped config keeps meaning SimPO
    # each loss's paper defaults
    assert (cfg.dpo.beta, cfg.dpo.label_smoothing, cfg.orpo.lam, cfg.cpo.beta, cfg.cpo.alpha) == (0.1, 0.0, 0.1, 0.1, 1.0)
    assert (cfg.arpo.beta, cfg.arpo.alpha, cfg.arpo.relax_coefficient_1, cfg.arpo.relax_coefficient_2) == (0.1, 1.0, 0.9, 0.4)
    assert cfg.simpo.sft_reduction == "tokens"
    assert build({**base, "loss": {"type": "dpo"}, "dpo": {"beta": 0.3}}).dpo.beta == 0.3
    # DPO on top of an SFT adapter would take the bare base as its reference: refused, naming both ways out
    with pytest.raises(ConfigError, match=r"model.sft_adapter = 'sft-run' with loss.type dpo.*qsimpo merge.*simpo, orpo"):
        build({"model": {"name_or_path": "m", "sft_adapter": "sft-run"}, "data": {"path": "d"}, "loss": {"type": "dpo"}})
    assert build({"model": {"name_or_path": "m", "sft_adapter": "sft-run"}, "data": {"path": "d"},
                  "loss": {"type": "orpo"}}).loss.type == "orpo"
    with pytest.raises(ConfigError) as e:
        build({**base, "loss": {"type": "dpo"}, "simpo": {"beta": 2.5}, "orpo": {"lam": 0.5}, "cpo": {"gamma": 1.0},
               "arpo": {"relax_coefficient_1": 0.8}})
    assert e.value.problems == [
        "simpo.beta = 2.5 belongs to the simpo loss, and loss.type is dpo: set --loss.type simpo to train with it, or "
        "remove simpo.beta from the config",
        "orpo.lam = 0.5 belongs to the orpo loss, and loss.type is dpo: set --loss.type orpo to train with it, or remove "
        "orpo.lam from the config",
        "arpo.relax_coefficient_1 = 0.8 belongs to the arpo loss, and loss.type is dpo: set --loss.type arpo to train with "
        "it, or remove arpo.relax_coefficient_1 from the config",
        "cpo.gamma is not a parameter of the cpo loss: gamma belongs to the simpo loss (simpo.gamma); each loss's "
        "parameters go in the section of its name, chosen by loss.type",
    ]
    with pytest.raises(ConfigError, match=r"loss.beta is not a parameter of any loss here: beta belongs to the simpo, "
                                          r"dpo, cpo and arpo losses \(simpo.beta, dpo.beta, cpo.beta, arpo.beta\)"):
        build({**base, "loss": {"type": "dpo", "beta": 0.2}})
    with pytest.raises(ConfigError, match="loss.type = 'kto' is not one of simpo, dpo, orpo, cpo, arpo"):
        build({**base, "loss": {"type": "kto"}})


def test_saved_config_of_another_loss_loads_again(tmp_path):
    """config.yaml, as a run writes it, holds the chosen loss's section only and loads back to the same config."""
    cfg = build({"model": {"name_or_path": "m"}, "data": {"path": "d"}, "loss": {"type": "orpo"}, "orpo": {"lam": 0.25}})
    text = dump_yaml(cfg)
    assert "orpo:" in text and "simpo:" not in text and "dpo:" not in text
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    # a config written before loss sections existed (simpo and train only) still loads as SimPO
    old = load_config(ROOT / "configs" / "quickstart.yaml")
    assert old.loss.type == "simpo" and old.simpo.beta == 2.5
