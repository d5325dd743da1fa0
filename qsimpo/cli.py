"""The command table: `qsimpo COMMAND ...` → the command's function, built by qsimpo.grammar. No logic of its own.

Each command lists the parameters of its function a user may set, with their help; types and defaults
come from the function's signature. What the arguments alone can show (a missing path, a file where a
folder belongs, a wrong choice, an output folder that is not ours) is checked before the function's
module, and with it torch, is imported. docs/cli.md is generated from this table (`python -m qsimpo.cli_docs`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from qsimpo.console import is_main, say
from qsimpo.errors import OutputExists, QsimpoError, UsageError
from qsimpo.grammar import Command, Opt, constant
from qsimpo.paths import (check_adapter_arg, check_folder_arg, check_model_arg, check_out_folder, check_source_arg,
                          names_local)
from qsimpo.record import COMMAND_RECORD, write_settings
from qsimpo.run_dir import META

# ----------------------------------------------------------------------------------- shared options
BASE_HELP = "base model Hub id or folder (default: the one the adapter's qsimpo.json records)"
TRUST = "run custom modelling code shipped with the model (off: only code transformers ships)"
SCORER_HELP = constant("qsimpo.pairs.scorers:SPEC_HELP")


def check_scorer_arg(spec: str, flag: str) -> None:
    """A scorer file that is not there, or a reward-model folder that is not there (the module form imports later)."""
    target, sep, name = spec.rpartition(":")
    if sep and target and name and not (len(target) == 1 and name.startswith(("\\", "/"))):
        if (target.endswith(".py") or "/" in target or os.sep in target) and not Path(target).expanduser().is_file():
            raise UsageError(f"{flag} {spec}: no file {target}; give path/to/file.py:function or module:function")
    elif names_local(spec) and not Path(spec).expanduser().exists():
        raise UsageError(f"{flag} {spec}: no such folder; give a reward model's folder or Hub id, or module:function")


def at_least_1(value: int, flag: str) -> None:
    """A count that must be >= 1, said as the command's own check says it (they agree; this one runs sooner)."""
    if value < 1:
        raise UsageError(f"{flag} {value}: give a whole number >= 1")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _config_opts(*extra: Opt, out: bool = False) -> list[Opt]:
    opts = [Opt("config", "YAML config with sections model, lora, data, loss, simpo (or dpo, orpo, cpo, arpo), train (see configs/)", positional=True),
            *extra,
            Opt("base", "the base (SFT) model: Hub id, folder or .gguf file (sets model.name_or_path)", metavar="MODEL"),
            Opt("trust_remote_code", TRUST + " (sets model.trust_remote_code)")]
    if out:
        opts += [Opt("seed", "random seed of LoRA init, shuffling and dropout (sets train.seed)"),
                 Opt("out", "folder the adapter, checkpoints and logs are written to (sets train.output_dir)",
                     metavar="DIR"),
                 Opt("overwrite", "replace a finished adapter in --out, or write into a folder that is not a run "
                                  "(sets train.overwrite)"),
                 Opt("dry_run", "check the config and its paths, print the resolved config and where it would be "
                                "written; load and write nothing")]
    return opts


# ------------------------------------------------------------------------------------ output checks
def _eval_check(s: dict, given: dict) -> None:
    adapters = s["adapter"] if isinstance(s["adapter"], list) else [s["adapter"]]
    if len(adapters) == 1:  # one adapter: the settings (and command.json) are those of one adapter, as ever
        s["adapter"] = given["adapter"] = adapters[0]
    if s.get("out") is None:  # the default, resolved here so the folder checked is the folder written
        local = Path(adapters[0])
        if len(adapters) > 1:
            from qsimpo.eval.compare import default_out

            s["out"] = default_out(adapters)
        else:
            s["out"] = str(local / "eval" if local.is_dir() else Path("eval") / adapters[0].replace("/", "--"))
        given["out"] = s["out"]
    check_out_folder(s["out"], "--out", {"eval.json", "report.html", COMMAND_RECORD}, s["overwrite"], "eval.json")


def _quickstart_check(s: dict, given: dict) -> None:
    from qsimpo.quickstart import OWN

    check_out_folder(s["out"], "--out", {*OWN, "votes.jsonl", COMMAND_RECORD}, s["overwrite"], "the quickstart")


def _merge_check(s: dict, given: dict) -> None:
    out = Path(s["out"])
    try:
        merged = "merged_from" in json.loads((out / META).read_text())
    except (OSError, ValueError):
        merged = False
    if merged and not s["overwrite"]:
        raise OutputExists(f"{out} already holds a merged model: choose another --out, or pass --overwrite to replace it")
    check_out_folder(out, "--out", None, s["overwrite"], "the merged model")


def _pairs_check(s: dict, given: dict) -> None:
    out = Path(s["out"])
    if out.is_dir():
        raise OutputExists(f"--out {out} is a folder; qsimpo pairs appends its pairs to a JSONL file: pass a file name "
                           "such as pairs.jsonl")
    if out.is_file() and out.stat().st_size and not Path(f"{out}.settings.json").exists():
        raise OutputExists(f"{out} exists and was not written by `qsimpo pairs` (no {out.name}.settings.json beside it): "
                           "pass another --out")


def _push_check(s: dict, given: dict) -> None:
    if bool(s.get("repo_id")) == bool(s.get("space_id")):
        raise UsageError("give --repo OWNER/NAME (upload the adapter or merged model) or --space OWNER/NAME (publish the "
                         "demo of an adapter already on the Hub), one of the two")
    if s.get("repo_id"):
        check_folder_arg(s["folder"], "", "pass the folder qsimpo train or qsimpo merge wrote (with --repo)", hub=None)


# ------------------------------------------------------------------------------------- the commands
COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("sft", "supervised fine-tuning of a LoRA adapter (a base model's first step; docs/sft.md)",
            "Supervised fine-tuning of a LoRA adapter on a 4-bit base, the loss on the assistant's tokens.",
            ("qsimpo.train.sft:sft_command",), _config_opts(out=True), overrides=True),
    Command("train", "train a LoRA adapter with SimPO", "Train a LoRA adapter with SimPO on a 4-bit base model.",
            ("qsimpo.commands:train",), _config_opts(out=True), overrides=True),
    Command("inspect-data", "show tokenized pairs (or, with --sft, conversations) and the data summary",
            "Show tokenized pairs with the prompt/response boundary and masks, and the data summary.",
            ("qsimpo.commands:inspect_data",),
            _config_opts(Opt("rows", "how many pairs to print", old=("--n",)),
                         Opt("sft", "the config is for `qsimpo sft`: show conversations (trained and masked tokens) "
                                    "and how they pack")), overrides=True),
    Command("quickstart", "align SmolLM2-135M-Instruct on shipped pairs, on the CPU: before and after",
            "SimPO on SmolLM2-135M-Instruct's NF4 base with the preference pairs shipped in the package: held-out reward "
            "accuracy and greedy answers before and after (offline after the first fetch, CPU, a few minutes).",
            ("qsimpo.quickstart:run_quickstart",),
            [Opt("out", "output folder", metavar="DIR"),
             Opt("overwrite", "replace --out, whatever it holds"),
             Opt("tiny", "a tiny model built on the spot instead (seconds; no download)"),
             Opt("max_steps", "train this many optimizer steps instead of the config's")],
            dry_run=True, check=_quickstart_check),
    Command("plan", "peak GPU memory of training and eval for a config, and which knob to turn",
            "Estimate peak GPU memory for a training config; exit 1 if it does not fit.",
            ("qsimpo.commands:plan",),
            _config_opts(Opt("gpu_memory", "the GPU's memory, e.g. 24GiB, 80GB", metavar="SIZE"),
                         Opt("processes", "processes the run is launched with (torchrun --nproc_per_node): with "
                                          "train.fsdp the weights are split between them", convert=positive),
                         Opt("from_data", "size the worst micro-batch from the config's own data (tokenized as training "
                                          "would) instead of assuming every row fills data.max_length", old=("--data",)),
                         Opt("sft", "the config is for `qsimpo sft`: size micro-batches of conversations, the loss on "
                                    "their assistant tokens")), overrides=True),
    Command("eval", "held-out reward accuracy, margins, length diagnostics, judged answers: SFT vs aligned",
            "Held-out reward accuracy, margins and length diagnostics of the SFT model (adapter off) and the aligned "
            "model (adapter on); with --scorer, both models' answers judged (win rate, length-controlled win rate). "
            "Several adapters on one base are compared side by side with the SFT model and with each other, in one "
            "report (docs/evaluate.md). Writes eval.json, report.html and command.json into --out.",
            ("qsimpo.eval.evaluate:evaluate",),
            [Opt("adapter", "adapter folder (qsimpo train's output_dir) or Hub id; several (on one base) to compare "
                 "them", positional=True, check=check_adapter_arg),
             Opt("data", "held-out pairs: JSONL/JSON/parquet file, datasets folder or Hub dataset id (default: the "
                 "run's data.eval from the adapter's config.yaml); with --scorer or --generate, prompts alone will do "
                 "(a prompt column; the preference metrics are then skipped)", check=check_source_arg),
             Opt("split", "split to read from a Hub dataset or DatasetDict folder (default: the run's data.split)"),
             Opt("max_rows", "read at most this many rows (pairs or prompts)", check=at_least_1),
             Opt("generate", "also answer N held-out prompts with both models (default: none; with --scorer, every "
                 "held-out prompt)", metavar="N"),
             Opt("max_new_tokens", "longest generated answer, in tokens", check=at_least_1),
             Opt("temperature", "sampling temperature of the answers (default: 0.7; with --scorer 0, greedy)"),
             Opt("top_p", "nucleus sampling of the answers (at temperature > 0)"),
             Opt("seed", "seed of prompt i is seed + i, the same for both models; also seeds --scorer's bootstrap"),
             Opt("scorer", f"judge both models' answers to the held-out prompts with {SCORER_HELP}, as in qsimpo "
                 "pairs: mean score of each, the aligned model's win rate against SFT (ties count half) and its "
                 "length-controlled win rate, with 95%% bootstrap intervals; answers every held-out prompt greedily "
                 "unless --generate/--temperature say otherwise", metavar="SCORER", check=check_scorer_arg),
             Opt("base", BASE_HELP, check=check_model_arg, metavar="MODEL"),
             Opt("batch_size", "pairs per forward pass when scoring, prompts per generate call when answering, "
                 "answers per reward-model batch", check=at_least_1),
             Opt("beta", "β for rewards and loss (default: the run's simpo.beta)"),
             Opt("gamma", "γ for the loss (default: the run's resolved simpo γ)"),
             Opt("out", "output folder (default: ADAPTER/eval for a local adapter; for several, eval-A-vs-B-... beside "
                 "the first adapter's folder)", metavar="DIR"),
             Opt("trust_remote_code", "run the modelling code a --scorer reward model ships (e.g. ArmoRM)")],
            dry_run=True, overwrite=True, check=_eval_check,
            retired={"--judge": "--judge was replaced by --scorer, which takes the same reward models and Python scorers "
                                "as qsimpo pairs: pass --scorer {value}"}),
    Command("demo", "chat with the SFT and aligned models side by side; votes become training data",
            "Chat with the SFT model (adapter off) and the aligned model (adapter on) side by side, one base in "
            "memory; votes are saved as training pairs. Several --adapter: the SFT model and one column per adapter, "
            "labelled by its name and loss, all answered in one batched generation.",
            ("qsimpo.demo.app:launch_demo",),
            [Opt("adapter", "adapter folder or Hub id (default: the quickstart's adapters/quickstart/adapter); "
                 "repeatable: one column each, all on one base", check=check_adapter_arg, metavar="DIR_OR_HUB_ID"),
             Opt("base", BASE_HELP, check=check_model_arg, metavar="MODEL"),
             Opt("compare_adapter", "a second adapter (folder or Hub id) for the left column instead of the SFT model",
                 check=check_adapter_arg),
             Opt("votes", "JSONL file votes are appended to (default: votes.jsonl beside a local adapter folder)"),
             Opt("votes_repo", "also commit the votes to this Hub dataset repo every few minutes (a Space's votes "
                 "outlive a restart; needs a write token)", metavar="OWNER/NAME"),
             Opt("host", "address to bind (0.0.0.0 exposes the demo to your network)"),
             Opt("port", "port (default: the first free one from 7860)"),
             Opt("share", "also open a public gradio.live link (off by default)"),
             Opt("trust_remote_code", TRUST)]),
    Command("merge", "merge an adapter into its base, verified",
            "Merge an adapter into its base and save a standalone transformers model, verified against the adapter "
            "on its 4-bit base.",
            ("qsimpo.export.merge:merge",),
            [Opt("adapter", "adapter folder (qsimpo train's output_dir) or Hub id", positional=True,
                 check=check_adapter_arg),
             Opt("out", "folder to write the merged model to (must not exist)", metavar="DIR"),
             Opt("base_weights", "merge into the dequantized NF4 weights the adapter was trained on, or the original "
                 "weights", choices=constant("qsimpo.export.merge:BASE_WEIGHTS")),
             Opt("dtype", "dtype of the saved weights (16-bit ones may round the adapter away; verify says)",
                 choices=constant("qsimpo.export.merge:DTYPES")),
             Opt("base", BASE_HELP, check=check_model_arg, metavar="MODEL"),
             Opt("max_kl", "fail when the mean KL (nats/token) to the adapter on its 4-bit base exceeds this"),
             Opt("max_ratio", "fail when that KL exceeds this fraction of the adapter's own effect (its KL, adapter "
                 "on vs off)"),
             Opt("n_probes", "probe sequences to verify on", flag="--probes"),
             Opt("verify", "skip the comparison with the adapter", flag="--no-verify"),
             Opt("max_shard_size", "largest safetensors shard (larger models are split)", metavar="SIZE"),
             Opt("overwrite", "replace --out if it exists (only once the new merge passed)"),
             Opt("gguf", "also write OUT/gguf/NAME-TYPE.gguf for llama.cpp and Ollama, read back and checked against "
                 "the merged model, with an Ollama Modelfile (repeatable; {types}); {lora}: the adapter alone as "
                 "OUT/gguf/NAME-LoRA-F32.gguf for llama.cpp's --lora on a GGUF of the base".format(
                     types=", ".join(constant("qsimpo.export.gguf_out:TYPES")), lora=constant("qsimpo.export.gguf_lora:LORA")),
                 metavar="TYPE", convert=str.lower,
                 choices=(*constant("qsimpo.export.gguf_out:TYPES"), constant("qsimpo.export.gguf_lora:LORA")))],
            dry_run=True, check=_merge_check),
    Command("push", "upload an adapter or merged model to the Hub with a model card; --space: the demo as a Space",
            "Upload an adapter or merged folder to the Hugging Face Hub with a model card (only the model's files; "
            "never checkpoints, logs or tokens): --repo. Or publish the side-by-side demo of an adapter already on the "
            "Hub as a Gradio Space (the repository's demo/ folder, configured for the adapter, carrying qsimpo as a "
            "wheel): --space.",
            ("qsimpo.export.hub:push", "qsimpo.export.space:push_space"),
            [Opt("folder", "with --repo: the adapter folder (qsimpo train) or merged folder (qsimpo merge); with --space: "
                 "the adapter's Hub id (push it first with --repo): the Space downloads it", positional=True,
                 metavar="FOLDER_OR_ADAPTER_ID", to={"qsimpo.export.space:push_space": "adapter"}),
             Opt("repo_id", "Hub repo id to upload to, OWNER/NAME", flag="--repo", required=False, metavar="OWNER/NAME"),
             Opt("space_id", "Space id to publish the demo to, OWNER/NAME", flag="--space", required=False,
                 metavar="OWNER/NAME"),
             Opt("base", "Hub id of the base model, required when qsimpo.json records a local path (default: the one "
                 "the adapter's qsimpo.json records)", old=("--base-model",), metavar="MODEL",
                 to={"qsimpo.export.hub:push": "base_model"}),
             Opt("private", "create the repo or Space private"),
             Opt("dry_run", "print the files that would go and the card or README header; send nothing"),
             Opt("license", "--repo: license for the card (default: the local base's card license, else 'other')"),
             Opt("datasets", "--repo: Hub id of a training data set for the card (repeatable)", flag="--dataset",
                 metavar="HUB_ID"),
             Opt("include", "--repo: also upload files matching this pattern (repeatable)", metavar="PATTERN"),
             Opt("hardware", "--space: the README header's suggested_hardware (zero-a10g: ZeroGPU)",
                 choices=constant("qsimpo.export.space:HARDWARE")),
             Opt("more_adapters", "--space: one more adapter's Hub id, served as a column of its own beside the first "
                 "(repeatable; all on one base)", flag="--adapter", metavar="HUB_ID"),
             Opt("votes_repo", "--space: the Hub dataset repo the Space commits its votes to (its QSIMPO_VOTES_REPO)",
                 metavar="OWNER/NAME")],
            check=_push_check, choose=lambda s: 1 if s.get("space_id") else 0),
    Command("pairs", "on-policy pairs: sample, score, best vs worst",
            "On-policy preference pairs (the SimPO paper's recipe): sample --num-samples answers per prompt from the SFT "
            "model, score them, write best as chosen and worst as rejected. Resumes an interrupted run from --out, the "
            "one output that is a file, not a folder.",
            ("qsimpo.pairs.run:make_pairs",),
            [Opt("prompts", "prompts: JSONL/JSON/parquet file, datasets folder or Hub dataset id, with a prompt column "
                 "(string or messages) or preference rows (their conversation before the answer)", positional=True,
                 check=check_source_arg),
             Opt("model", "the policy: a base model (Hub id, folder or .gguf file) or an adapter (folder or Hub id; "
                 "loaded on its recorded base, or --base)", check=check_model_arg),
             Opt("scorer", SCORER_HELP, check=check_scorer_arg),
             Opt("out", "JSONL file the pairs are appended to, with FILE.settings.json beside it (rerun the same "
                 "command to resume)", metavar="FILE"),
             Opt("n", "answers sampled per prompt", flag="--num-samples", old=("--n",)),
             Opt("temperature", "sampling temperature"),
             Opt("top_p", "nucleus sampling"),
             Opt("max_new_tokens", "longest answer, in tokens", check=at_least_1),
             Opt("max_prompts", "answer at most the first N distinct prompts (default: all)", check=at_least_1),
             Opt("seed", "answer k to a prompt is seeded by (seed, prompt, k), whatever the batch"),
             Opt("batch_size", "prompts per generate call (each with --num-samples answers; with vLLM give more, e.g. 64)", check=at_least_1),
             Opt("split", "split of a Hub dataset or DatasetDict folder"),
             Opt("subset", "configuration (subset) of a Hub dataset"),
             Opt("prompt_column", "the column holding the prompt, when it is not called prompt (e.g. instruction)",
                 metavar="COLUMN"),
             Opt("base", "base model for an adapter --model (default: the one its qsimpo.json records)",
                 check=check_model_arg, metavar="MODEL"),
             Opt("on_bad_row", "a malformed prompt row stops the run, or is skipped and counted",
                 choices=("error", "skip")),
             Opt("backend", "what samples: transformers' generate (the base in 4 bits), vLLM (pip install vllm; a CUDA "
                 "GPU, one process, the base in its own 16-bit dtype, an adapter through vLLM's LoRA), or auto: vLLM "
                 "where it imports and a CUDA GPU is visible, else transformers; recorded in --out's settings",
                 choices=constant("qsimpo.pairs.vllm_backend:BACKENDS")),
             Opt("system_prompt", "system message the prompts are rendered with, as training's data.system_prompt renders "
                 "them (default: an adapter's recorded data.system_prompt; none for a base model)", metavar="TEXT"),
             Opt("trust_remote_code", "run custom modelling code shipped with the models")],
            dry_run=True, check=_pairs_check),
]}


def output_of(name: str, settings: dict) -> Path | None:
    """The folder a command writes (its command.json goes there), or None (demo, push: nothing local; pairs: a file)."""
    return Path(settings["out"]) if name in ("eval", "merge", "quickstart") else None


def dry_run(name: str, settings: dict) -> None:
    out = settings.get("out")
    where = (f"append pairs to {out} (settings in {out}.settings.json)" if name == "pairs" else
             f"write into {out}/" if out else "write nothing")
    flags = {o.param: o.param.upper() if o.positional else o.flags[0] for o in COMMANDS[name].options}
    say(f"dry run: nothing was loaded or written. qsimpo {name} would {where}, with these settings:")
    for key, value in settings.items():
        if key != "dry_run":
            say(f"  {flags.get(key, '--' + key.replace('_', '-'))} {value!r}")


def run(name: str, argv: list[str]) -> int:
    command = COMMANDS[name]
    given, settings = command.parse(argv)
    if settings.get("dry_run") and command.dry_run:
        dry_run(name, settings)
        return 0
    # train: an interrupted run prints the command to resume
    extra = {"command": ["qsimpo", name, *argv]} if name in ("train", "sft") else {}
    try:
        result = command.call(given, settings, **extra)
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        raise UsageError('the demo needs gradio: pip install "gradio>=6,<7"') from None
    out = output_of(name, settings)
    if out is not None and out.is_dir() and is_main():
        write_settings(out, settings, ["qsimpo", name, *argv])
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    return ("usage: qsimpo COMMAND [ARGS...]   (qsimpo COMMAND --help: its options)\n\ncommands:\n" + "\n".join(lines) +
            "\n\nexit codes: 0 done; 1 a check that ran and failed (plan does not fit, merge or GGUF does not verify, "
            "non-finite training);\n2 something typed or pointed at must change (the message says what); 130 interrupted")


OTHER_PROCESS_ERROR_WAIT_S = 30  # how long a process other than 0 leaves process 0 to say an error they share


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(usage())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    debug = "--debug" in argv[1:] or os.environ.get("QSIMPO_DEBUG", "") not in ("", "0")
    args = [a for a in argv[1:] if a != "--debug"]
    try:
        return run(argv[0], args)
    except QsimpoError as e:
        if debug:
            traceback.print_exc()
        if not (debug or is_main()):
            # under torchrun/accelerate the processes meet the same config, data and run, and process 0 says it. The
            # launcher stops every process once one exits, so this one waits first: had it exited at once, process 0
            # could be stopped before its message was out, and the user would read no error at all. Still running
            # after the wait, it met an error of its own, and says it.
            time.sleep(OTHER_PROCESS_ERROR_WAIT_S)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside a training step (loading, tokenizing): nothing to save
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
