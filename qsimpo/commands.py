"""The commands that read a training config: train, inspect-data, plan (the last two for `qsimpo sft` too: --sft).

Each takes the YAML config and its ``--section.key VALUE`` overrides, plus the spellings every
command shares (``--base``, ``--seed``, ``--out``, ``--overwrite``, ``--trust-remote-code``), which
are the config keys they name. The config and what its paths show (a missing data file, a file
where the output folder belongs) are checked here, before torch, transformers and peft import.
"""

from __future__ import annotations

from pathlib import Path

from qsimpo.console import is_main, say
from qsimpo.errors import CheckFailed, InputNotFound, QsimpoError, UsageError

# shared spelling -> the config key it sets
SHARED = {"base": "model.name_or_path", "seed": "train.seed", "out": "train.output_dir",
          "overwrite": "train.overwrite", "trust_remote_code": "model.trust_remote_code"}
# files a `qsimpo train` run folder holds once it started (config.yaml is written first): a folder with files but
# none of these is not a run, and is not written into without --overwrite
RUN_MARKERS = ("config.yaml", "qsimpo.json", "command.json")


def load(config: str, overrides: list[str], **shared):
    """The validated Config: the YAML, the shared spellings given, then the overrides (one key given twice fails)."""
    from qsimpo.config import load_config

    extra = []
    for name, value in shared.items():
        if value is None or value is False:
            continue
        key = SHARED[name]
        if any(o == f"--{key}" or o.startswith(f"--{key}=") for o in overrides):
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} and --{key} set the same thing: give one of them")
        extra += [f"--{key}", "true" if value is True else str(value)]
    return load_config(config, [*extra, *overrides])


def check_paths(cfg, data: bool = True, output: bool = True) -> None:
    """What the config's paths alone show, every problem at once: missing local data or model, an output folder that
    is a file or not a run."""
    from qsimpo.paths import check_model_arg, check_out_folder, check_source_arg

    checks = []
    if data:
        checks.append(lambda: check_source_arg(cfg.data.path, "data.path ="))
        if cfg.data.eval is not None and cfg.data.eval_fraction is None:
            checks.append(lambda: check_source_arg(str(cfg.data.eval), "data.eval ="))
    checks.append(lambda: check_model_arg(cfg.model.name_or_path, "model.name_or_path ="))
    if output:
        out = Path(cfg.train.output_dir)
        is_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)  # resuming, replacing: training decides
        own = frozenset(p.name for p in out.iterdir()) if is_run else frozenset()
        checks.append(lambda: check_out_folder(out, "--train.output_dir", own, cfg.train.overwrite, "the adapter"))
    problems = []
    for check in checks:
        try:
            check()
        except InputNotFound as e:
            if "model.name_or_path" in str(e):
                e = InputNotFound(f"model.name_or_path = {cfg.model.name_or_path!r} could not be loaded: there is no "
                                  "such local model folder or .gguf file; give a Hub id (OWNER/NAME) or the folder of a "
                                  "saved model")
            problems.append(e)
        except QsimpoError as e:
            problems.append(e)
    if problems:
        raise type(problems[0])("; ".join(map(str, problems)))


def train(config: str, overrides: list[str] = (), base: str | None = None, seed: int | None = None,
          out: str | None = None, overwrite: bool = False, trust_remote_code: bool = False, dry_run: bool = False,
          command: list[str] | None = None) -> int:
    """`qsimpo train`: the config checked, then the recipe (qsimpo.train.recipe.train); the settings recorded."""
    cfg = load(config, list(overrides), base=base, seed=seed, out=out, overwrite=overwrite,
               trust_remote_code=trust_remote_code)
    check_paths(cfg)
    output_dir = Path(cfg.train.output_dir)
    if dry_run:
        from qsimpo.config import dump_yaml

        say(f"dry run: nothing was loaded or written. qsimpo train would write the adapter, checkpoints, metrics.jsonl, "
            f"config.yaml, qsimpo.json and command.json into {output_dir}/, with this config:\n")
        say(dump_yaml(cfg), end="")
        return 0
    from qsimpo.record import write_settings
    from qsimpo.train.recipe import train as run_training

    run = run_training(cfg, command=command)  # an interrupted run prints it to resume
    if is_main():
        write_settings(run.output_dir, cfg.to_dict(), command)
    say(f"adapter written to {run.output_dir}")
    return 0


def inspect_data(config: str, overrides: list[str] = (), rows: int = 3, sft: bool = False, base: str | None = None,
                 trust_remote_code: bool = False) -> int:
    """`qsimpo inspect-data`: ``rows`` tokenized pairs with their boundaries and masks, then the data summary;
    with ``sft``, conversations as `qsimpo sft` reads them (trained and masked tokens), then how they pack."""
    cfg = load(config, list(overrides), base=base, trust_remote_code=trust_remote_code)
    check_paths(cfg, output=False)
    if sft:
        return inspect_conversations(cfg, rows)
    from qsimpo.data import format_pair, read_source, tokenize_source
    from qsimpo.train.model import load_tokenizer

    source = read_source(cfg.data)  # bad rows stop here, before the tokenizer loads
    tok = load_tokenizer(cfg.model)
    pairs, summary = tokenize_source(cfg.data, source, tok)
    for pair in pairs[:rows]:
        say(format_pair(tok, pair))
    say(summary.report())
    return 0


def inspect_conversations(cfg, rows: int) -> int:
    """`qsimpo inspect-data --sft`: the config checked as `qsimpo sft` checks it, the data read the way it reads it."""
    from qsimpo.data import read_source
    from qsimpo.data.conversations import format_conversation, sft_report, tokenize_conversations
    from qsimpo.templates import require_template
    from qsimpo.train.model import load_tokenizer
    from qsimpo.train.sft import check_sft_config, packing_text

    check_sft_config(cfg)
    source = read_source(cfg.data, conversations=True)  # bad rows stop here, before the tokenizer loads
    tok = load_tokenizer(cfg.model)
    require_template(tok, cfg.model.name_or_path, "qsimpo inspect-data --sft")
    convs, summary = tokenize_conversations(cfg.data, source, tok)
    for conv in convs[:rows]:
        say(format_conversation(tok, conv))
    say(packing_text(cfg, [len(c["input_ids"]) for c in convs]))
    say(sft_report(summary))
    return 0


def plan(config: str, overrides: list[str] = (), gpu_memory: str = "24GiB", processes: int = 1, from_data: bool = False,
         sft: bool = False, base: str | None = None, trust_remote_code: bool = False) -> int:
    """`qsimpo plan`: peak GPU memory of the config's run; exit 1 (a check that ran and failed) when it does not fit."""
    from qsimpo.config import parse_size as size

    if processes < 1:
        raise UsageError(f"--processes {processes}: give the number of processes the run is launched with (1 or more)")
    try:
        memory = size(gpu_memory)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = load(config, list(overrides), base=base, trust_remote_code=trust_remote_code)
    check_paths(cfg, data=from_data, output=False)
    from qsimpo.train.plan import data_lengths, plan as estimate

    if sft:
        from qsimpo.train.sft import check_sft_config

        check_sft_config(cfg)
    text, fits = estimate(cfg, memory, lengths=data_lengths(cfg, sft) if from_data else None, processes=processes,
                          sft=sft)
    say(text)
    return 0 if fits else CheckFailed.exit_code
