"""`qsimpo push`: share an adapter folder or a merged folder on the Hugging Face Hub, with a model card.

    qsimpo push adapters/run --repo you/llama3-8b-simpo --dry-run     # the files and the card, nothing sent
    qsimpo push merged/run --repo you/llama3-8b-simpo-merged --private

Only the files that make up the model go: weights, configs, tokenizer, ``qsimpo.json`` (its base
model rewritten to the Hub id, local paths reduced to names) and a generated ``README.md`` card.
Checkpoints, optimizer state, logs and tokens stay home unless named with ``--include``.
Everything up to the upload is local and tested; ``upload`` is the one function that talks to the Hub.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from qsimpo.console import say
from qsimpo.errors import InputNotFound, QsimpoError
from qsimpo.record import qsimpo_version
from qsimpo.run_dir import ADAPTER_FILES, META

MODEL_FILES = ["config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
               "model.safetensors.index.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"]
GENERATED = ("README.md", META)  # written by push itself, never copied from the folder
TAGS = ["qsimpo", "simpo", "qlora", "preference-optimization", "alignment", "nf4"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # where we push: always "owner/name"


LOSS_NAMES = {  # the card's sentence for each loss.type
    "simpo": "SimPO (Meng, Xia & Chen, 2024: reference-free, length-normalized preference optimization)",
    "dpo": "DPO (Rafailov et al., 2023; its reference is the base with the adapter off)",
    "orpo": "ORPO (Hong, Lee & Thorne, 2024: odds-ratio preference optimization with an NLL term)",
    "cpo": "CPO (Xu et al., 2024: contrastive preference optimization with an NLL term)",
    "arpo": "ARPO (X-ALMA, Xu et al., 2024: CPO with a rejection weight adapted to how alike the pair is)",
}


class PushError(QsimpoError, RuntimeError):
    """A push that cannot or must not go ahead; the message names the flag or file and the fix."""


@dataclass
class PushPlan:
    repo_id: str
    folder: Path
    kind: str  # "adapter" or "merged"
    files: list[str]  # paths relative to folder, uploaded as they are
    generated: dict[str, str] = field(default_factory=dict)  # README.md and qsimpo.json, written by push
    private: bool = False
    notes: list[str] = field(default_factory=list)  # card fields that fell back to a default

    def describe(self) -> str:
        names = sorted(self.files + list(self.generated))
        sizes = {n: (self.folder / n).stat().st_size if n in self.files else len(self.generated[n].encode()) for n in names}
        lines = [f"{self.kind} {self.folder} -> https://huggingface.co/{self.repo_id}"
                 f"{' (private)' if self.private else ''}: {len(names)} files, {sum(sizes.values()) / 1e6:.1f} MB"]
        lines += [f"  {n:<40} {sizes[n]:>12,d} bytes{'  (generated)' if n in self.generated else ''}" for n in names]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the folder
def folder_kind(folder: Path) -> str:
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("model*.safetensors")):
        return "merged"
    raise PushError(f"{folder} holds neither an adapter (adapter_config.json) nor a merged model (config.json + "
                    "model*.safetensors): pass the folder `qsimpo train` or `qsimpo merge` wrote")


def select_files(folder: Path, kind: str, include: list[str] = ()) -> list[str]:
    """Files that belong in the repo: the model's own files, plus whatever ``include`` patterns name."""
    patterns = list(ADAPTER_FILES if kind == "adapter" else MODEL_FILES) + TOKENIZER_FILES
    # a run on top of `qsimpo sft` keeps its SFT adapter in sft/ (qsimpo.train.stack): the SFT side of eval and the demo
    nested = [f"sft/{name}" for name in ADAPTER_FILES] if kind == "adapter" else []
    chosen = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        top_level = "/" not in rel
        if rel in GENERATED:
            continue
        if (top_level and any(fnmatch.fnmatch(rel, pat) for pat in patterns)) or rel in nested or \
                any(fnmatch.fnmatch(rel, pat) for pat in include):
            chosen.append(rel)
    return chosen


def final_metrics(adapter: str, meta: dict) -> dict:
    """The last logged training (and held-out) metrics: from qsimpo.json, or the folder's metrics.jsonl."""
    if meta.get("final_metrics"):
        return meta["final_metrics"]
    from qsimpo.run_dir import read_metrics

    rows = read_metrics(adapter)
    train = next((r for r in reversed(rows) if "loss" in r), None)
    held = next((r for r in reversed(rows) if "eval_loss" in r), None)
    out = {}
    if train:
        out["train"] = {k: v for k, v in train.items() if k not in ("epoch",)}
    if held:
        out["eval"] = {k: v for k, v in held.items() if k.startswith("eval_") or k == "step"}
    return out


def _is_local(path: str) -> bool:
    from qsimpo.load import is_local  # the one rule for "a path, not a Hub id"

    return is_local(path)


def _name_only(path: str) -> str:
    return Path(path).name if _is_local(path) else path


def hub_base_model(meta: dict, override: str | None, folder: Path) -> str:
    """The base model as a Hub id; a local path is refused unless the user names the Hub id."""
    from qsimpo.load import hub_name

    recorded = meta.get("base_model")
    if recorded:
        recorded = hub_name(str(recorded))  # qsimpo's own copy of a Hub model (the quickstart's) is named by its Hub id
    if override:
        if _is_local(override):
            raise PushError(f"--base {override!r} is not a Hub model id: give it as OWNER/NAME, e.g. meta-llama/Meta-Llama-3-8B-Instruct")
        return override
    if not recorded:
        raise PushError(f"{folder / META} records no base model: name it with --base OWNER/NAME")
    if _is_local(recorded):
        raise PushError(f"{folder / META} records the base model as the local path {recorded!r}, and a card "
                        "must name a Hub id: pass --base OWNER/NAME (the Hub model that folder holds)")
    return recorded


def _hub_datasets(config: dict, extra: list[str]) -> list[str]:
    data = config.get("data") or {}
    found = [p for p in (data.get("path"), data.get("eval")) if isinstance(p, str) and not _is_local(p)
             and not re.fullmatch(r"[\d.]+", p)]
    return list(dict.fromkeys(found + list(extra)))


def _base_license(meta: dict) -> str | None:
    """The license in the card of a locally held base model, if it has one."""
    readme = Path(str(meta.get("base_model", ""))) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.license


# ---------------------------------------------------------------------------------------------- the card
def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _table(row: dict) -> str:
    return "\n".join(["| " + " | ".join(row) + " |", "|" + "---|" * len(row),
                      "| " + " | ".join(_fmt(v) for v in row.values()) + " |"])


def _snippet(kind: str, repo_id: str, base_model: str, quantization: str, dtype: str) -> str:
    if kind == "merged":
        return f'''```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype=torch.{dtype}, device_map="auto")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```'''
    quant = {"nf4": '''    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
''', "int8": "    quantization_config=BitsAndBytesConfig(load_in_8bit=True),\n"}.get(quantization, "")
    return f'''```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

base = AutoModelForCausalLM.from_pretrained(
    "{base_model}",
{quant}    dtype=torch.bfloat16,
    device_map="auto",
)
model = PeftModel.from_pretrained(base, "{repo_id}")  # the {quantization} base it was trained on
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

or, with qsimpo installed: `from qsimpo.train.model import load_trained; model, tokenizer = load_trained("{repo_id}")`.'''


def _data_section(meta: dict) -> str:
    lines = []
    for split, s in (meta.get("data") or {}).items():
        dropped = {k: n for k, n in (s.get("dropped") or {}).items() if n}
        why = f" ({', '.join(f'{k} {n}' for k, n in dropped.items())})" if dropped else ""
        lines.append(f"- {split}: `{_name_only(str(s.get('source', '?')))}`, format {s.get('format') or 'unknown'}: "
                     f"{s.get('rows_read')} rows read, {s.get('kept')} pairs kept, {sum(dropped.values())} dropped{why}; "
                     f"{s.get('truncated_prompt', 0)} prompts and {s.get('truncated_response', 0)} responses truncated")
    return "\n".join(lines) or "No data summary was recorded."


def build_card(kind: str, repo_id: str, base_model: str, meta: dict, config: dict, license: str, datasets: list[str]):
    """The model card: Hub metadata (YAML header) + what was trained, on what, and how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    # which loss trained it, with its parameters: qsimpo.json's "loss" (a run from before it: SimPO, under "simpo")
    loss = meta.get("loss") or {"type": "simpo", **(meta.get("simpo") or {})}
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if kind == "adapter" else "finetune",
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        license=license,
        datasets=datasets or None,
        tags=[t if t != "simpo" else loss["type"] for t in TAGS] + (["lora", "peft"] if kind == "adapter" else ["merged-lora"]),
    )
    simpo, train, lora = meta.get("simpo") or {}, config.get("train") or {}, config.get("lora") or {}
    quantization = meta.get("quantization", "nf4")
    if loss["type"] == "simpo":
        beta, gamma = simpo.get("beta"), simpo.get("gamma_resolved")
        hyper = {"β (beta)": beta, "γ (gamma)": gamma, "γ/β": gamma / beta if beta and gamma is not None else None,
                 "learning rate": train.get("learning_rate"), "steps": meta.get("global_step"),
                 "loss type": simpo.get("loss_type"), "label smoothing": simpo.get("label_smoothing"),
                 "SFT weight": simpo.get("sft_weight"), "LoRA r / α": f"{lora.get('r', '?')} / {lora.get('alpha', '?')}"}
    else:
        hyper = {"loss": loss["type"], **{k: v for k, v in loss.items() if k != "type"},
                 "learning rate": train.get("learning_rate"), "steps": meta.get("global_step"),
                 "LoRA r / α": f"{lora.get('r', '?')} / {lora.get('alpha', '?')}"}
    params = ", ".join(f"{k} {_fmt(v)}" for k, v in loss.items() if k != "type")
    metrics = meta.get("final_metrics") or {}
    shown = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    name = repo_id.split("/")[-1]
    if kind == "adapter":
        what = (f"A LoRA adapter for [{base_model}](https://huggingface.co/{base_model}), trained with "
                f"{LOSS_NAMES.get(loss['type'], loss['type'])} on the {quantization} base (QLoRA) by qsimpo "
                f"{qsimpo_version(meta)}.")
    else:
        into = (f"the dequantized {quantization} weights it was trained against" if meta.get("base_weights") == "dequantized"
                else "the original (unquantized) base weights")
        what = (f"[{base_model}](https://huggingface.co/{base_model}) with a {loss['type'].upper()} QLoRA adapter merged into {into}, "
                f"saved in {meta.get('dtype', 'bfloat16')}. Quantizing this model to 4-bit again re-rounds the merged "
                "weights and changes its outputs: for 4-bit inference, load the adapter on the 4-bit base instead.")
    body = [f"# {name}", "", what, "", "## Training", "", f"Loss: {loss['type']}" + (f" ({params})" if params else ""), "",
            _table(hyper), ""]
    steps = meta.get("global_step")
    for split, title in (("train", "Final training metrics"), ("eval", "Held-out metrics")):
        if metrics.get(split):
            row = {k: metrics[split].get(("eval_" if split == "eval" else "") + k) for k in shown}
            step = metrics[split].get("step", "?")
            # metrics are logged every train.logging_steps steps: the last logged step need not be the last step
            if step == steps or steps is None:
                body += [f"### {title} (step {step})", "", _table(row), ""]
            else:
                body += [f"### {title.replace('Final t', 'T')} (last logged: step {step} of {steps})", "", _table(row), ""]
    body += ["## Data", "", _data_section(meta), ""]
    verify = meta.get("verify")
    if kind == "merged" and verify:
        body += ["## Merge check", "", f"Next-token distributions of this model against the adapter, on {verify['probes']}:", "",
                 "| against | mean KL (nats/token) | top-1 agreement |", "|---|---|---|",
                 f"| adapter on its 4-bit base | {verify['four_bit']['kl']:.2e} | {verify['four_bit']['top1']:.1%} |",
                 f"| adapter on the dequantized base | {verify['dequantized']['kl']:.2e} | {verify['dequantized']['top1']:.1%} |"]
        if verify.get("adapter_effect"):  # how far the adapter moves its base: the scale the numbers above compare to
            body.append(f"| (for scale: adapter on vs off, 4-bit) | {verify['adapter_effect']['kl']:.2e} | "
                        f"{verify['adapter_effect']['top1']:.1%} |")
        body.append("")
    body += ["## Usage", "", _snippet(kind, repo_id, base_model, quantization, meta.get("dtype", "bfloat16")), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def hub_metadata(meta: dict, base_model: str, metrics: dict) -> dict:
    """qsimpo.json as uploaded: the base named by its Hub id, local paths reduced to their names."""
    out = {**meta, "base_model": base_model, "final_metrics": metrics}
    if base_model != meta.get("base_model"):  # a GGUF file named inside the local base means nothing on the Hub id
        out["base_model_gguf_file"] = None
    if out.get("merged_from"):
        out["merged_from"] = _name_only(str(out["merged_from"]))
    out["data"] = {split: {**s, "source": _name_only(str(s.get("source", "")))} for split, s in (meta.get("data") or {}).items()}
    return out


# ----------------------------------------------------------------------------------------------- the push
def plan_push(folder: str | Path, repo_id: str, base_model: str | None = None, private: bool = False,
              license: str | None = None, datasets: list[str] = (), include: list[str] = ()) -> PushPlan:
    """Everything a push will send, decided locally: the files, the card and the metadata."""
    from qsimpo.run_dir import json_text, read_config_yaml, read_meta

    folder = Path(folder)
    if not folder.is_dir():
        raise InputNotFound(f"{folder}: no such folder; pass an adapter folder (qsimpo train) or a merged folder (qsimpo merge)")
    if not _REPO_ID.match(repo_id):
        raise PushError(f"--repo {repo_id!r} must be OWNER/NAME, e.g. your-name/llama3-8b-simpo")
    kind = folder_kind(folder)
    meta = read_meta(str(folder))
    base = hub_base_model(meta, base_model, folder)
    config = read_config_yaml(folder)
    metrics = final_metrics(str(folder), meta)
    record = hub_metadata(meta, base, metrics)
    license, notes = license or _base_license(meta), []
    if not license:
        license = "other"
        notes.append("license: other (none given, and no local base card to copy it from): pass --license, "
                     "e.g. the base model's license")
    hub_datasets = _hub_datasets(config, list(datasets))
    if not hub_datasets:
        notes.append("datasets: none on the Hub recorded (the training data was local): name it with --dataset OWNER/NAME")
    card = build_card(kind, repo_id, base, record, config, license, hub_datasets)
    generated = {"README.md": str(card), META: json_text(record)}
    return PushPlan(repo_id, folder, kind, select_files(folder, kind, list(include)), generated, private, notes)


def find_token(token: str | None = None) -> str:
    """The Hub token (argument, HF_TOKEN, or `hf auth login`), checked for shape before anything is sent."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write "
                        "access (https://huggingface.co/settings/tokens), then push again; --dry-run needs none")
    if not re.fullmatch(r"hf_\w{8,}", token.strip()):
        raise PushError("the Hugging Face token (HF_TOKEN or the one saved by `hf auth login`) is not a valid token: "
                        "user access tokens look like 'hf_...'; create one at https://huggingface.co/settings/tokens")
    return token.strip()


def check_write_access(whoami: dict, repo_id: str) -> None:
    """Refuse before creating anything when the token cannot write to the repo's owner."""
    owner = repo_id.split("/")[0]
    names = {whoami.get("name")} | {org.get("name") for org in whoami.get("orgs") or []}
    role = ((whoami.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PushError(f"the token of {whoami.get('name')} is read-only: create a token with write access at "
                        "https://huggingface.co/settings/tokens and run `hf auth login` again")
    if owner not in names:
        raise PushError(f"--repo {repo_id}: the token belongs to {whoami.get('name')}, who is not {owner!r} nor a member "
                        f"of it (orgs: {', '.join(sorted(n for n in names - {whoami.get('name')} if n)) or 'none'})")


def upload(plan: PushPlan, token: str) -> str:
    """The one function that talks to the Hub: check the token, create the repo, upload one commit."""
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        who = api.whoami()
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise PushError("the Hub rejected the token (401 Unauthorized): run `hf auth login` with a valid write "
                            "token, or fix HF_TOKEN; nothing was sent") from e
        raise PushError(f"could not check the token with the Hub ({e}); nothing was sent") from e
    check_write_access(who, plan.repo_id)
    api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
    # One folder holding exactly the planned files: links to the real ones (no copy of large
    # weights) and the generated card and metadata.
    with tempfile.TemporaryDirectory(prefix="qsimpo-push-") as tmp:
        staging = Path(tmp)
        for rel in plan.files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).symlink_to((plan.folder / rel).resolve())
        for rel, text in plan.generated.items():
            (staging / rel).write_text(text)
        commit = api.upload_folder(repo_id=plan.repo_id, folder_path=staging,
                                   commit_message=f"qsimpo push: {plan.kind} from {plan.folder.name}")
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{plan.repo_id}"


def push(folder: str | Path, repo_id: str, base_model: str | None = None, private: bool = False, dry_run: bool = False,
         license: str | None = None, datasets: list[str] = (), include: list[str] = (), log=say) -> PushPlan:
    """Plan the push, print it, and (unless ``dry_run``) upload it."""
    plan = plan_push(folder, repo_id, base_model, private, license, datasets, include)
    token = None if dry_run else find_token()  # before any output suggests something was sent
    log(plan.describe())
    if dry_run:
        log("\n--- README.md ---\n" + plan.generated["README.md"])
        log("dry run: nothing was sent")
        return plan
    log(f"uploaded: {upload(plan, token)}")
    return plan
