"""`qsimpo push`, offline: file selection, the model card (parsed back with huggingface_hub's own
parser), the refusals, and `upload` itself with the Hub client's network methods replaced."""

from __future__ import annotations

import json
import re

import pytest
from huggingface_hub import ModelCard

from conftest import make_config
from qsimpo.export import hub
from qsimpo.cli import main as cli
from qsimpo.config import dump_yaml
from qsimpo.export.hub import PushError, plan_push, push

ADAPTER_UPLOAD = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja"}
MERGED_UPLOAD = {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"}
LEFT_HOME = ["checkpoint-2/adapter_model.safetensors", "checkpoint-2/optimizer.pt", "checkpoint-2/scheduler.pt",
             "checkpoint-2/rng_state.pth", "checkpoint-2/trainer_state.json", "training_args.bin", "metrics.jsonl",
             "runs/events.out.tfevents.1", "config.yaml", "votes.jsonl", ".env", "token"]


def _write(folder, files: dict):
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def _meta(base: str, **extra) -> str:
    return json.dumps({
        "qsimpo_version": "0.1.0", "base_model": base, "base_model_revision": None, "quantization": "nf4",
        "simpo": {"beta": 2.5, "gamma": None, "gamma_beta_ratio": 0.55, "label_smoothing": 0.0, "loss_type": "sigmoid",
                  "sft_weight": 0.0, "gamma_resolved": 1.375},
        "global_step": 120, "epoch": 1.0,
        "data": {"train": {"source": "/home/me/secret/pairs.jsonl", "rows_read": 1500, "kept": 1498,
                           "dropped": {"empty_text": 2, "too_long": 0}, "truncated_prompt": 31, "truncated_response": 4,
                           "format": "implicit"}},
        **extra,
    })


@pytest.fixture
def adapter_dir(tmp_path):
    """An adapter folder as `qsimpo train` leaves it: the adapter, and everything that must stay home."""
    cfg = make_config("org/base-model", "/home/me/secret/pairs.jsonl", tmp_path / "run", "--data.eval", "org/prefs")
    metrics = [{"step": 119, "loss": 0.61}, {"step": 120, "loss": 0.42, "rewards/accuracies": 0.81, "rewards/margins": 1.7,
                                               "rewards/chosen": -1.2, "rewards/rejected": -2.9},
               {"step": 120, "eval_loss": 0.5, "eval_rewards/accuracies": 0.77, "eval_rewards/margins": 1.1}]
    files = {name: "x" for name in ADAPTER_UPLOAD | set(LEFT_HOME)}
    files.update({"qsimpo.json": _meta("org/base-model"), "config.yaml": dump_yaml(cfg),
                  "metrics.jsonl": "".join(json.dumps(r) + "\n" for r in metrics),
                  "README.md": "---\nlibrary_name: peft\n---\npeft's placeholder card"})
    return _write(tmp_path / "run", files)


@pytest.fixture
def merged_dir(tmp_path):
    verify = {"four_bit": {"kl": 1.2e-3, "top1": 0.97, "positions": 400},
              "dequantized": {"kl": 2e-6, "top1": 1.0, "positions": 400},
              "adapter_effect": {"kl": 0.044, "top1": 0.96, "positions": 400},
              "max_kl": 0.02, "probes": "8 probes from the training data", "passed": True}
    files = {name: "x" for name in MERGED_UPLOAD}
    files.update({"qsimpo.json": _meta("org/base-model", merged_from="/home/me/adapters/run", base_weights="dequantized",
                                       dtype="bfloat16", verify=verify, final_metrics={"train": {"step": 120, "loss": 0.42}}),
                  "config.yaml": "lora: {r: 16, alpha: 32}\ntrain: {learning_rate: 1.0e-05}\n"})
    return _write(tmp_path / "merged", files)


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


@pytest.fixture
def no_upload(monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("upload must not be reached")

    monkeypatch.setattr(hub, "upload", refuse)


def test_adapter_card_metadata_and_body(adapter_dir):
    plan = plan_push(adapter_dir, "me/tiny-simpo", license="apache-2.0")
    card = ModelCard(plan.generated["README.md"])  # huggingface_hub's own parser
    data = card.data.to_dict()
    assert data["base_model"] == "org/base-model" and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft" and data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    assert {"simpo", "qlora", "preference-optimization", "lora"} <= set(data["tags"])
    assert data["datasets"] == ["org/prefs"]  # the Hub data set from config.yaml; the local file is not a Hub id
    body = card.text
    for expected in ("| 2.5 | 1.375 | 0.55 | 0.01 | 120 |", "Final training metrics (step 120)", "| 0.42 | 0.81 | 1.7 |",
                     "Held-out metrics (step 120)", "| 0.5 | 0.77 | 1.1 |", "`pairs.jsonl`, format implicit: 1500 rows read, "
                     "1498 pairs kept, 2 dropped (empty_text 2); 31 prompts and 4 responses truncated",
                     'PeftModel.from_pretrained(base, "me/tiny-simpo")', 'bnb_4bit_quant_type="nf4"'):
        assert expected in body, expected
    snippet = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    compile(snippet, "snippet", "exec")  # copy-paste ready: at least valid Python
    uploaded = json.loads(plan.generated["qsimpo.json"])
    assert uploaded["base_model"] == "org/base-model" and uploaded["final_metrics"]["train"]["loss"] == 0.42
    assert "/home/me" not in plan.generated["qsimpo.json"] + plan.generated["README.md"], "no local paths leave the machine"


def test_merged_card(merged_dir):
    plan = plan_push(merged_dir, "me/tiny-simpo-merged", license="llama3")
    card = ModelCard(plan.generated["README.md"])
    assert card.data.library_name == "transformers" and card.data.base_model_relation == "finetune"
    assert card.data.base_model == "org/base-model" and card.data.license == "llama3"
    assert "merged into the dequantized nf4 weights" in card.text
    assert "| adapter on its 4-bit base | 1.20e-03 | 97.0% |" in card.text
    assert "| (for scale: adapter on vs off, 4-bit) | 4.40e-02 | 96.0% |" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-simpo-merged", dtype=torch.bfloat16' in card.text
    assert "| 1e-05 |" in card.text
    assert json.loads(plan.generated["qsimpo.json"])["merged_from"] == "run"
    assert set(plan.files) == MERGED_UPLOAD


def test_dry_run_prints_files_and_card_and_sends_nothing(adapter_dir, no_token, no_upload, capsys):
    plan = push(adapter_dir, "me/tiny-simpo", dry_run=True)
    assert set(plan.files) == ADAPTER_UPLOAD  # exactly: no checkpoints, optimizer, logs, config.yaml, tokens
    assert set(plan.generated) == {"README.md", "qsimpo.json"}
    printed = capsys.readouterr().out
    listing = printed.split("--- README.md ---")[0]
    listed = {line.split()[0] for line in listing.splitlines() if line.startswith("  ")}
    assert listed == ADAPTER_UPLOAD | {"README.md", "qsimpo.json"}
    assert "library_name: peft" in printed and "nothing was sent" in printed
    assert "license: other" in printed and "note: license: other" in printed  # no --license, no local base card

    with_logs = plan_push(adapter_dir, "me/tiny-simpo", include=["metrics.jsonl", "config.yaml"])
    assert set(with_logs.files) == ADAPTER_UPLOAD | {"metrics.jsonl", "config.yaml"}

    assert cli(["push", str(adapter_dir), "--repo", "me/tiny-simpo", "--dry-run"]) == 0


def test_refuses_local_base_path(adapter_dir, tmp_path, no_upload, capsys):
    base = tmp_path / "base"
    base.mkdir()
    (adapter_dir / "qsimpo.json").write_text(_meta(str(base)))
    with pytest.raises(PushError, match="local path .*--base OWNER/NAME"):
        plan_push(adapter_dir, "me/tiny-simpo")
    assert cli(["push", str(adapter_dir), "--repo", "me/tiny-simpo", "--dry-run"]) == 2  # a refusal: the user changes it
    assert "--base OWNER/NAME" in capsys.readouterr().err
    with pytest.raises(PushError, match="not a Hub model id"):
        plan_push(adapter_dir, "me/tiny-simpo", base_model=str(base))
    plan = plan_push(adapter_dir, "me/tiny-simpo", base_model="org/base-model")
    assert ModelCard(plan.generated["README.md"]).data.base_model == "org/base-model"
    with pytest.raises(PushError, match="--repo 'tiny' must be OWNER/NAME"):
        plan_push(adapter_dir, "tiny", base_model="org/base-model")
    with pytest.raises(PushError, match="neither an adapter .* nor a merged model"):
        plan_push(tmp_path / "base", "me/x", base_model="org/base-model")


def test_missing_or_malformed_token_stops_before_upload(adapter_dir, no_token, no_upload, monkeypatch, capsys):
    with pytest.raises(PushError, match="no Hugging Face token found: run `hf auth login` or set HF_TOKEN"):
        push(adapter_dir, "me/tiny-simpo")
    assert cli(["push", str(adapter_dir), "--repo", "me/tiny-simpo"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", "my password")
    with pytest.raises(PushError, match="not a valid token"):
        push(adapter_dir, "me/tiny-simpo")


def test_write_access_check():
    me = {"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}
    hub.check_write_access(me, "me/x")
    hub.check_write_access(me, "lab/x")
    with pytest.raises(PushError, match="not 'other'.*orgs: lab"):
        hub.check_write_access(me, "other/x")
    with pytest.raises(PushError, match="read-only"):
        hub.check_write_access({**me, "auth": {"accessToken": {"role": "read"}}}, "me/x")


class FakeApi:
    """huggingface_hub.HfApi with its three network methods recorded instead of sent."""

    calls: list = []
    whoami_error: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def whoami(self):
        FakeApi.calls.append(("whoami", self.token))
        if FakeApi.whoami_error:
            raise FakeApi.whoami_error
        return {"name": "me", "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message):
        from pathlib import Path

        folder = Path(folder_path)
        staged = {p.relative_to(folder).as_posix(): p.read_text() for p in folder.rglob("*") if p.is_file()}
        FakeApi.calls.append(("upload_folder", repo_id, staged))


def test_upload_sends_exactly_the_plan(adapter_dir, monkeypatch):
    import huggingface_hub

    FakeApi.calls, FakeApi.whoami_error = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "a" * 34)
    plan = push(adapter_dir, "me/tiny-simpo", private=True, log=lambda *_: None)
    (_, token), (_, repo, private, exist_ok), (_, repo2, staged) = FakeApi.calls
    assert token == "hf_" + "a" * 34 and (repo, private, exist_ok, repo2) == ("me/tiny-simpo", True, True, "me/tiny-simpo")
    assert set(staged) == ADAPTER_UPLOAD | {"README.md", "qsimpo.json"}
    assert staged["README.md"] == plan.generated["README.md"] and staged["adapter_config.json"] == "x"

    from huggingface_hub.errors import HfHubHTTPError

    response = type("R", (), {"status_code": 401, "headers": {}, "request": None})()
    FakeApi.calls, FakeApi.whoami_error = [], HfHubHTTPError("401 Unauthorized", response=response)
    with pytest.raises(PushError, match="rejected the token.*nothing was sent"):
        push(adapter_dir, "me/tiny-simpo", log=lambda *_: None)
    assert [c[0] for c in FakeApi.calls] == ["whoami"]


def test_card_names_the_loss_and_its_parameters(adapter_dir):
    simpo_card = ModelCard(plan_push(adapter_dir, "me/tiny-simpo").generated["README.md"]).text
    assert "trained with SimPO (Meng" in simpo_card and "Loss: simpo (beta 2.5, " in simpo_card  # a run before loss.type
    meta = json.loads(_meta("org/base-model"))
    del meta["simpo"]
    meta["loss"] = {"type": "dpo", "beta": 0.1, "label_smoothing": 0.0}
    (adapter_dir / "qsimpo.json").write_text(json.dumps(meta))
    card = ModelCard(plan_push(adapter_dir, "me/tiny-dpo").generated["README.md"])
    assert "trained with DPO (Rafailov et al., 2023; its reference is the base with the adapter off)" in card.text
    assert "Loss: dpo (beta 0.1, label_smoothing 0)" in card.text and "| dpo | 0.1 | 0 |" in card.text, card.text
    assert "dpo" in card.data.to_dict()["tags"] and "simpo" not in card.data.to_dict()["tags"]
