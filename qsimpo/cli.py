"""The command table: `qsimpo COMMAND ...` → the command's function. No logic of its own."""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import traceback

from qsimpo.config import help_text, load_config
from qsimpo.errors import QsimpoError


def _config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides (--section.key VALUE), one per config field:\n" + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config with sections model, lora, data, simpo, train (see configs/)")
    return p


def cmd_train(argv: list[str]) -> int:
    p = _config_parser("qsimpo train", "Train a LoRA adapter with SimPO on a 4-bit base model.")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    from qsimpo.train.recipe import train

    run = train(cfg, command=["qsimpo", "train", *argv])  # an interrupted run prints it to resume
    print(f"adapter written to {run.output_dir}")
    return 0


def cmd_inspect_data(argv: list[str]) -> int:
    p = _config_parser("qsimpo inspect-data", "Show tokenized pairs with the prompt/response boundary and masks, and the data summary.")
    p.add_argument("--n", type=int, default=3, help="how many pairs to print")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    from qsimpo.data import format_pair, read_source, tokenize_source
    from qsimpo.train.model import load_tokenizer

    source = read_source(cfg.data)  # bad rows stop here, before the tokenizer loads
    tok = load_tokenizer(cfg.model)
    pairs, summary = tokenize_source(cfg.data, source, tok)
    for pair in pairs[: args.n]:
        print(format_pair(tok, pair))
    print(summary.report())
    return 0


class _Command:
    """A command's parser built against the function it calls: each argument is one of its parameters.

    Defaults live in the function's signature only: help shows them from there, an option left
    out is not passed, and the function is called by keyword (``run``).
    """

    def __init__(self, prog: str, description: str, fn):
        self.fn, self.params = fn, inspect.signature(fn).parameters
        self.parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)

    def arg(self, *flags: str, help: str, **kw) -> None:
        action = self.parser.add_argument(*flags, help=help, **kw)
        default = self.params[action.dest].default  # a flag naming no parameter fails here, at once
        if action.option_strings and action.nargs != 0 and default not in (None, inspect.Parameter.empty):
            action.help += f" (default: {default})"

    def run(self, argv: list[str]):
        return self.fn(**vars(self.parser.parse_args(argv)))


def cmd_quickstart(argv: list[str]) -> int:
    from qsimpo.quickstart import run_quickstart

    c = _Command("qsimpo quickstart", "SimPO on SmolLM2-135M-Instruct's NF4 base with the preference pairs shipped in "
                 "the package: held-out reward accuracy and greedy answers before and after (offline after the first "
                 "fetch, CPU, a few minutes).", run_quickstart)
    c.arg("--out", help="output folder")
    c.arg("--overwrite", action="store_true", help="replace an existing quickstart output")
    c.arg("--tiny", action="store_true", help="a tiny model built on the spot instead (seconds; no download)")
    c.arg("--max-steps", type=int, help="train this many optimizer steps instead of the config's")
    c.run(argv)
    return 0


def cmd_demo(argv: list[str]) -> int:
    try:
        from qsimpo.demo.app import launch_demo
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        print('error: the demo needs gradio: pip install "gradio>=6,<7"', file=sys.stderr)
        return 2
    c = _Command("qsimpo demo", "Chat with the SFT model (adapter off) and the aligned model (adapter on) side by side, "
                 "one base in memory; votes are saved as training pairs.", launch_demo)
    c.arg("--adapter", help="adapter folder or Hub id (default: the quickstart's adapters/quickstart/adapter)")
    c.arg("--base", help="base model Hub id or folder (default: the one the adapter's qsimpo.json records)")
    c.arg("--compare-adapter", help="a second adapter (folder or Hub id) for the left column instead of the SFT model")
    c.arg("--votes", help="JSONL file votes are appended to (default: votes.jsonl beside a local adapter folder)")
    c.arg("--host", help="address to bind (0.0.0.0 exposes the demo to your network)")
    c.arg("--port", type=int, help="port (default: the first free one from 7860)")
    c.arg("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    c.arg("--trust-remote-code", action="store_true", help="run custom modelling code shipped with the base model")
    # a missing quickstart output or adapter, or a port in use, is a QsimpoError that main() prints
    c.run(argv)
    return 0


def cmd_merge(argv: list[str]) -> int:
    from qsimpo.export.gguf_lora import LORA
    from qsimpo.export.gguf_out import TYPES as GGUF_TYPES
    from qsimpo.export.merge import BASE_WEIGHTS, DTYPES, merge

    c = _Command("qsimpo merge", "Merge an adapter into its base and save a standalone transformers model, verified "
                 "against the adapter on its 4-bit base.", merge)
    c.arg("adapter", help="adapter folder (qsimpo train's output_dir) or Hub id")
    c.arg("--out", required=True, help="folder to write the merged model to (must not exist)")
    c.arg("--base-weights", choices=BASE_WEIGHTS,
          help="merge into the dequantized NF4 weights the adapter was trained on, or the original weights")
    c.arg("--dtype", choices=DTYPES, help="dtype of the saved weights (16-bit ones may round the adapter away; verify says)")
    c.arg("--base", help="base model Hub id or folder (default: the one the adapter's qsimpo.json records)")
    c.arg("--max-kl", type=float, help="fail when the mean KL (nats/token) to the adapter on its 4-bit base exceeds this")
    c.arg("--max-ratio", type=float,
          help="fail when that KL exceeds this fraction of the adapter's own effect (its KL, adapter on vs off)")
    c.arg("--probes", dest="n_probes", type=int, help="probe sequences to verify on")
    c.arg("--no-verify", dest="verify", action="store_false", help="skip the comparison with the adapter")
    c.arg("--max-shard-size", help="largest safetensors shard (larger models are split)")
    c.arg("--overwrite", action="store_true", help="replace --out if it exists (only once the new merge passed)")
    c.arg("--gguf", action="append", metavar="TYPE", type=str.lower, choices=[*GGUF_TYPES, LORA],
          help=f"also write OUT/gguf/NAME-TYPE.gguf for llama.cpp and Ollama, read back and checked against the merged "
               f"model, with an Ollama Modelfile (repeatable; {', '.join(GGUF_TYPES)}); {LORA}: the adapter alone as "
               f"OUT/gguf/NAME-LoRA-F32.gguf for llama.cpp's --lora on a GGUF of the base")
    c.run(argv)
    return 0


SPACE_USAGE = ("qsimpo push ADAPTER_HUB_ID --space OWNER/NAME [--base ID] [--hardware cpu-basic|zero-a10g|...] "
               "[--private] [--dry-run]: publish the side-by-side demo of an adapter on the Hub as a Gradio Space "
               "(demo/ with a qsimpo wheel; --dry-run lists every file and the README header)")


def cmd_push_space(argv: list[str]) -> int:
    from qsimpo.export.space import HARDWARE, push_space

    c = _Command("qsimpo push", "Publish the side-by-side demo of an adapter as a Hugging Face Space (the repository's "
                 "demo/ folder, configured for the adapter, carrying qsimpo as a wheel).", push_space)
    c.arg("adapter", help="the adapter's Hub id (push it first with --repo): the Space downloads it")
    c.arg("--space", dest="space_id", required=True, help="Space id, OWNER/NAME")
    c.arg("--base", help="base model Hub id (default: the one the adapter's qsimpo.json records)")
    c.arg("--hardware", choices=HARDWARE, help="the README header's suggested_hardware (zero-a10g: ZeroGPU)")
    c.arg("--private", action="store_true", help="create the Space private")
    c.arg("--dry-run", action="store_true", help="print every file and the README header; send nothing")
    c.run(argv)
    return 0


def cmd_push(argv: list[str]) -> int:
    from qsimpo.export.hub import push

    if any(a == "--space" or a.startswith("--space=") for a in argv):
        return cmd_push_space(argv)
    c = _Command("qsimpo push", "Upload an adapter or merged folder to the Hugging Face Hub with a model card (only "
                 "the model's files; never checkpoints, logs or tokens).", push)
    c.arg("folder", help="adapter folder (qsimpo train) or merged folder (qsimpo merge)")
    c.arg("--repo", dest="repo_id", required=True, help="Hub repo id, OWNER/NAME")
    c.arg("--private", action="store_true", help="create the repo private")
    c.arg("--dry-run", action="store_true", help="print the files that would go and the card; send nothing")
    c.arg("--base-model", help="Hub id of the base model, required when qsimpo.json records a local path")
    c.arg("--license", help="license for the card (default: the local base's card license, else 'other')")
    c.arg("--dataset", dest="datasets", action="append", help="Hub id of a training data set for the card (repeatable)")
    c.arg("--include", action="append", help="also upload files matching this pattern (repeatable)")
    c.parser.epilog = "The demo as a Space instead: " + SPACE_USAGE
    c.run(argv)
    return 0


def cmd_eval(argv: list[str]) -> int:
    from qsimpo.eval.evaluate import EvalError, evaluate
    from qsimpo.pairs.scorers import SPEC_HELP

    judge = next((a for a in argv if a == "--judge" or a.startswith("--judge=")), None)
    if judge is not None:  # retired: one scorer option for pairs and eval
        given = judge.partition("=")[2] or next(iter(argv[argv.index(judge) + 1:]), "MODEL_ID")
        raise EvalError(f"--judge was replaced by --scorer, which takes the same reward models and Python scorers as "
                        f"qsimpo pairs: pass --scorer {given}")
    c = _Command("qsimpo eval", "Held-out reward accuracy, margins and length diagnostics of the SFT model (adapter "
                 "off) and the aligned model (adapter on); with --scorer, both models' answers judged (win rate, "
                 "length-controlled win rate). Writes eval.json and report.html.", evaluate)
    c.arg("adapter", help="adapter folder (qsimpo train's output_dir) or Hub id")
    c.arg("--data", help="held-out pairs: JSONL/JSON/parquet file, datasets folder or Hub dataset id "
          "(default: the run's data.eval from the adapter's config.yaml); with --scorer or --generate, prompts "
          "alone will do (a prompt column; the preference metrics are then skipped)")
    c.arg("--split", help="split to read from a Hub dataset or DatasetDict folder (default: the run's data.split)")
    c.arg("--max-rows", type=int, help="read at most this many rows (pairs or prompts)")
    c.arg("--generate", type=int, metavar="N", help="also answer N held-out prompts with both models "
          "(default: none; with --scorer, every held-out prompt)")
    c.arg("--max-new-tokens", type=int, help="longest generated answer, in tokens")
    c.arg("--temperature", type=float, help="sampling temperature of the answers (default: 0.7; with --scorer 0, greedy)")
    c.arg("--top-p", type=float, help="nucleus sampling of the answers (at temperature > 0)")
    c.arg("--seed", type=int, help="seed of prompt i is seed + i, the same for both models; also seeds --scorer's "
          "bootstrap")
    c.arg("--scorer", metavar="SCORER", help=f"judge both models' answers to the held-out prompts with {SPEC_HELP}, "
          "as in qsimpo pairs: mean score of each, the aligned model's win rate against SFT (ties count half) and its "
          "length-controlled win rate, with 95%% bootstrap intervals; answers every held-out prompt greedily unless "
          "--generate/--temperature say otherwise")
    c.arg("--base", help="base model Hub id or folder (default: the one the adapter's qsimpo.json records)")
    c.arg("--batch-size", type=int, help="pairs per forward pass when scoring, prompts per generate call when answering, "
          "answers per reward-model batch")
    c.arg("--beta", type=float, help="β for rewards and loss (default: the run's simpo.beta)")
    c.arg("--gamma", type=float, help="γ for the loss (default: the run's resolved simpo γ)")
    c.arg("--out", help="output folder (default: ADAPTER/eval for a local adapter)")
    c.arg("--trust-remote-code", action="store_true", help="run the modelling code a --scorer reward model ships "
          "(e.g. ArmoRM)")
    c.run(argv)  # its problems are QsimpoErrors (EvalError) that main() prints
    return 0


def cmd_pairs(argv: list[str]) -> int:
    from qsimpo.pairs import make_pairs
    from qsimpo.pairs.scorers import SPEC_HELP
    from qsimpo.pairs.vllm_backend import BACKENDS

    c = _Command("qsimpo pairs", "On-policy preference pairs (the SimPO paper's recipe): sample n answers per prompt "
                 "from the SFT model, score them, write best as chosen and worst as rejected. Resumes an interrupted "
                 "run from --out.", make_pairs)
    c.arg("prompts", help="prompts: JSONL/JSON/parquet file, datasets folder or Hub dataset id, with a prompt column "
          "(string or messages) or preference rows (their conversation before the answer)")
    c.arg("--model", required=True, help="the policy: a base model (Hub id, folder or .gguf file) or an adapter "
          "(folder or Hub id; loaded on its recorded base)")
    c.arg("--scorer", required=True, help=SPEC_HELP)
    c.arg("--out", required=True, help="JSONL file the pairs are appended to (rerun the same command to resume)")
    c.arg("--n", "--num-samples", type=int, help="answers sampled per prompt (under torchrun spell it --num-samples: "
          "torchrun reads --n as an abbreviation of its own options)")
    c.arg("--temperature", type=float, help="sampling temperature")
    c.arg("--top-p", type=float, help="nucleus sampling")
    c.arg("--max-new-tokens", type=int, help="longest answer, in tokens")
    c.arg("--max-prompts", type=int, help="answer at most the first N distinct prompts (default: all)")
    c.arg("--seed", type=int, help="answer k to a prompt is seeded by (seed, prompt, k), whatever the batch")
    c.arg("--batch-size", type=int, help="prompts per generate call (each with --n answers; with vLLM give more, e.g. 64)")
    c.arg("--split", help="split of a Hub dataset or DatasetDict folder")
    c.arg("--subset", help="configuration (subset) of a Hub dataset")
    c.arg("--prompt-column", help="the column holding the prompt, when it is not called prompt (e.g. instruction)")
    c.arg("--base", help="base model for an adapter (default: the one its qsimpo.json records)")
    c.arg("--on-bad-row", choices=("error", "skip"), help="a malformed prompt row stops the run, or is skipped and counted")
    c.arg("--backend", choices=BACKENDS, help="what samples: transformers' generate (the base in 4 bits), vLLM (pip "
          "install vllm; a CUDA GPU, one process, the base in its own 16-bit dtype, an adapter through vLLM's LoRA), or "
          "auto: vLLM where it imports and a CUDA GPU is visible, else transformers; recorded in --out's settings")
    c.arg("--trust-remote-code", action="store_true", help="run custom modelling code shipped with the models")
    c.run(argv)
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def cmd_plan(argv: list[str]) -> int:
    p = _config_parser("qsimpo plan", "Estimate peak GPU memory for a training config; exit 1 if it does not fit.")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU's memory, e.g. 24GiB (default), 80GB")
    p.add_argument("--processes", type=_positive, default=1,
                   help="processes the run is launched with (torchrun --nproc_per_node): with train.fsdp the "
                        "weights are split between them")
    p.add_argument("--data", action="store_true",
                   help="size the worst micro-batch from the config's own data (tokenized as training would) "
                        "instead of assuming every row fills data.max_length")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    from qsimpo.train.plan import data_lengths, parse_size, plan

    text, fits = plan(cfg, parse_size(args.gpu_memory), lengths=data_lengths(cfg) if args.data else None,
                      processes=args.processes)
    print(text)
    return 0 if fits else 1


COMMANDS = {
    "train": (cmd_train, "train a LoRA adapter with SimPO"),
    "inspect-data": (cmd_inspect_data, "show tokenized pairs and the data summary"),
    "quickstart": (cmd_quickstart, "align SmolLM2-135M-Instruct on shipped pairs, on the CPU: before and after"),
    "plan": (cmd_plan, "peak GPU memory of training and eval for a config, and which knob to turn"),
    "eval": (cmd_eval, "held-out reward accuracy, margins, length diagnostics, judged answers: SFT vs aligned"),
    "demo": (cmd_demo, "chat with the SFT and aligned models side by side; votes become training data"),
    "merge": (cmd_merge, "merge an adapter into its base, verified"),
    "push": (cmd_push, "upload an adapter or merged model to the Hub with a model card"),
    "pairs": (cmd_pairs, "on-policy pairs: sample, score, best vs worst"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: qsimpo COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    fn, _ = COMMANDS[argv[0]]
    debug = "--debug" in argv[1:] or os.environ.get("QSIMPO_DEBUG", "") not in ("", "0")
    args = [a for a in argv[1:] if a != "--debug"]
    try:
        return fn(args)
    except QsimpoError as e:
        if debug:
            traceback.print_exc()
        if debug or os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun/accelerate the processes of a machine
            print(f"error: {e}", file=sys.stderr)                # meet the same config, data and run: one says it
        return e.exit_code
    except KeyboardInterrupt:  # outside a training step (loading, tokenizing): nothing to save
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
