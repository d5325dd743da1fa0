"""The command table: `qsimpo COMMAND ...` → the command's function. No logic of its own."""

from __future__ import annotations

import argparse
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


def cmd_quickstart(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qsimpo quickstart", description="SimPO on SmolLM2-135M-Instruct's NF4 base with "
                                "the preference pairs shipped in the package: held-out reward accuracy and greedy "
                                "answers before and after (offline after the first fetch, CPU, a few minutes).")
    p.add_argument("--out", default="adapters/quickstart", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing quickstart output")
    p.add_argument("--tiny", action="store_true", help="a tiny model built on the spot instead (seconds; no download)")
    p.add_argument("--max-steps", type=int, help="train this many optimizer steps instead of the config's")
    args = p.parse_args(argv)
    from qsimpo.quickstart import run_quickstart

    run_quickstart(args.out, overwrite=args.overwrite, tiny=args.tiny, max_steps=args.max_steps)
    return 0


def cmd_demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qsimpo demo", description="Chat with the SFT model (adapter off) and the aligned model "
                                "(adapter on) side by side, one base in memory; votes are saved as training pairs.")
    p.add_argument("--adapter", help="adapter folder or Hub id (default: the quickstart's adapters/quickstart/adapter)")
    p.add_argument("--base", help="base model Hub id or folder (default: the one the adapter's qsimpo.json records)")
    p.add_argument("--compare-adapter", help="a second adapter (folder or Hub id) for the left column instead of the SFT model")
    p.add_argument("--votes", help="JSONL file votes are appended to (default: votes.jsonl beside a local adapter folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the demo to your network)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--trust-remote-code", action="store_true", help="run custom modelling code shipped with the base model")
    args = p.parse_args(argv)
    try:
        from qsimpo.demo.app import launch_demo
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        print('error: the demo needs gradio: pip install "gradio>=6,<7"', file=sys.stderr)
        return 2
    # a missing quickstart output or adapter, or a port in use, is a QsimpoError that main() prints
    launch_demo(args.adapter, args.base, args.compare_adapter, args.votes, args.host, args.port, args.share,
                args.trust_remote_code)
    return 0


def cmd_merge(argv: list[str]) -> int:
    from qsimpo.export.merge import BASE_WEIGHTS, DEFAULT_DTYPE, DEFAULT_MAX_KL, DEFAULT_MAX_RATIO, DTYPES

    p = argparse.ArgumentParser(prog="qsimpo merge", description="Merge an adapter into its base and save a standalone "
                                "transformers model, verified against the adapter on its 4-bit base.")
    p.add_argument("adapter", help="adapter folder (qsimpo train's output_dir) or Hub id")
    p.add_argument("--out", required=True, help="folder to write the merged model to (must not exist)")
    p.add_argument("--base-weights", choices=BASE_WEIGHTS, default="dequantized",
                   help="merge into the dequantized NF4 weights the adapter was trained on (default) or the original weights")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help="dtype of the saved weights (16-bit ones may round the adapter away; verify says)")
    p.add_argument("--base", help="base model Hub id or folder (default: the one the adapter's qsimpo.json records)")
    p.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL,
                   help="fail when the mean KL (nats/token) to the adapter on its 4-bit base exceeds this")
    p.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO,
                   help="fail when that KL exceeds this fraction of the adapter's own effect (its KL, adapter on vs off)")
    p.add_argument("--probes", type=int, default=8, help="probe sequences to verify on")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the adapter")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (larger models are split)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the new merge passed)")
    args = p.parse_args(argv)
    from qsimpo.export.merge import merge

    merge(args.adapter, args.out, args.base_weights, args.dtype, verify=not args.no_verify, max_kl=args.max_kl,
          overwrite=args.overwrite, base=args.base, max_shard_size=args.max_shard_size, n_probes=args.probes,
          max_ratio=args.max_ratio)
    return 0


def cmd_push(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qsimpo push", description="Upload an adapter or merged folder to the Hugging Face "
                                "Hub with a model card (only the model's files; never checkpoints, logs or tokens).")
    p.add_argument("folder", help="adapter folder (qsimpo train) or merged folder (qsimpo merge)")
    p.add_argument("--repo", required=True, help="Hub repo id, OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="print the files that would go and the card; send nothing")
    p.add_argument("--base-model", help="Hub id of the base model, required when qsimpo.json records a local path")
    p.add_argument("--license", help="license for the card (default: the local base's card license, else 'other')")
    p.add_argument("--dataset", action="append", default=[], help="Hub id of a training data set for the card (repeatable)")
    p.add_argument("--include", action="append", default=[], help="also upload files matching this pattern (repeatable)")
    args = p.parse_args(argv)
    from qsimpo.export.hub import push

    push(args.folder, args.repo, args.base_model, args.private, args.dry_run, args.license, args.dataset, args.include)
    return 0


def cmd_eval(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qsimpo eval", description="Held-out reward accuracy, margins and length diagnostics "
                                "of the SFT model (adapter off) and the aligned model (adapter on); writes eval.json and report.html.")
    p.add_argument("adapter", help="adapter folder (qsimpo train's output_dir) or Hub id")
    p.add_argument("--data", help="held-out pairs: JSONL/JSON/parquet file, datasets folder or Hub dataset id "
                   "(default: the run's data.eval from the adapter's config.yaml)")
    p.add_argument("--split", help="split to read from a Hub dataset or DatasetDict folder (default: the run's data.split)")
    p.add_argument("--max-rows", type=int, help="score at most this many pairs")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also answer N held-out prompts with both models")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest generated answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature for --generate (0: greedy)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling for --generate")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt i is seed + i, the same for both models")
    p.add_argument("--judge", metavar="MODEL_ID", help="sequence-classification reward model that scores both answers (needs --generate)")
    p.add_argument("--base", help="base model Hub id or folder (default: the one the adapter's qsimpo.json records)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass when scoring")
    p.add_argument("--beta", type=float, help="β for rewards and loss (default: the run's simpo.beta)")
    p.add_argument("--gamma", type=float, help="γ for the loss (default: the run's resolved simpo γ)")
    p.add_argument("--out", help="output folder (default: ADAPTER/eval for a local adapter)")
    args = p.parse_args(argv)
    from qsimpo.eval.evaluate import EvalError, evaluate

    try:
        evaluate(args.adapter, args.data, args.split, args.max_rows, args.generate, args.out, args.judge, args.base,
                 args.batch_size, args.max_new_tokens, args.temperature, args.top_p, args.seed, args.beta, args.gamma)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in ("matplotlib", "scipy"):
            raise
        print(f'error: qsimpo eval needs {e.name}: pip install -e .', file=sys.stderr)
        return 2
    return 0


def cmd_plan(argv: list[str]) -> int:
    p = _config_parser("qsimpo plan", "Estimate peak GPU memory for a training config; exit 1 if it does not fit.")
    p.add_argument("--gpu-memory", default="24GiB", help="the GPU's memory, e.g. 24GiB (default), 80GB")
    p.add_argument("--data", action="store_true",
                   help="size the worst micro-batch from the config's own data (tokenized as training would) "
                        "instead of assuming every row fills data.max_length")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    from qsimpo.train.plan import data_lengths, parse_size, plan

    text, fits = plan(cfg, parse_size(args.gpu_memory), lengths=data_lengths(cfg) if args.data else None)
    print(text)
    return 0 if fits else 1


COMMANDS = {
    "train": (cmd_train, "train a LoRA adapter with SimPO"),
    "inspect-data": (cmd_inspect_data, "show tokenized pairs and the data summary"),
    "quickstart": (cmd_quickstart, "the whole path on a tiny local model, offline"),
    "plan": (cmd_plan, "estimate peak GPU memory for a config and say which knob to turn"),
    "eval": (cmd_eval, "held-out reward accuracy, margins and length diagnostics: SFT vs aligned"),
    "demo": (cmd_demo, "chat with the SFT and aligned models side by side; votes become training data"),
    "merge": (cmd_merge, "merge an adapter into its base, verified"),
    "push": (cmd_push, "upload an adapter or merged model to the Hub with a model card"),
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
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # outside a training step (loading, tokenizing): nothing to save
        if debug:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
