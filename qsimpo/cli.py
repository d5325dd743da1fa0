"""The command table: `qsimpo COMMAND ...` → the command's function. No logic of its own."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, help_text, load_config


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
    from .train import train

    run = train(cfg)
    print(f"adapter written to {run.output_dir}")
    return 0


def cmd_inspect_data(argv: list[str]) -> int:
    p = _config_parser("qsimpo inspect-data", "Show tokenized pairs with the prompt/response boundary and masks, and the data summary.")
    p.add_argument("--n", type=int, default=3, help="how many pairs to print")
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    from .data import build_dataset, format_pair
    from .model import load_tokenizer

    tok = load_tokenizer(cfg.model)
    pairs, summary = build_dataset(cfg.data, tok)
    for pair in pairs[: args.n]:
        print(format_pair(tok, pair))
    print(summary.line())
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qsimpo quickstart", description="Build a tiny model and data set locally, SFT it, then QLoRA-SimPO it (offline, CPU, a few minutes).")
    p.add_argument("--out", default="adapters/quickstart", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing quickstart output")
    args = p.parse_args(argv)
    from .quickstart import run_quickstart

    run_quickstart(args.out, overwrite=args.overwrite)
    return 0


COMMANDS = {
    "train": (cmd_train, "train a LoRA adapter with SimPO"),
    "inspect-data": (cmd_inspect_data, "show tokenized pairs and the data summary"),
    "quickstart": (cmd_quickstart, "the whole path on a tiny local model, offline"),
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
    try:
        return fn(argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
