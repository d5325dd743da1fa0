"""docs/cli.md, generated from the command table (qsimpo.cli) that builds the parsers: `python -m qsimpo.cli_docs > docs/cli.md`.

tests/test_cli.py regenerates it and compares, so the page says what the commands take.
"""

from __future__ import annotations

from qsimpo.grammar import DRY_RUN, EMPTY, OVERWRITE, Command, metavar

INTRO = """# Command line

Generated from the command table in `qsimpo/cli.py` by `python -m qsimpo.cli_docs > docs/cli.md`;
`qsimpo COMMAND --help` prints the same. Configuration keys of `train`, `inspect-data` and `plan`
(`--section.key VALUE`) are in [config.md](config.md).

## One grammar

- **One spelling per setting.** The base model is `--base` in every command (in `train`,
  `inspect-data` and `plan` it sets `model.name_or_path`); seeds are `--seed`; an output folder is
  `--out`; `--trust-remote-code` runs modelling code shipped with a model (`train`, `inspect-data`,
  `plan`, `demo`, `pairs`).
- **`--out` is a folder** the command writes its files into, with `command.json` (below). A folder
  holding files the command does not write there is refused unless `--overwrite`; a file where the
  folder belongs is refused always. The one exception is `qsimpo pairs`, whose `--out` is the JSONL
  file it appends to and resumes from (its settings in `FILE.settings.json` beside it).
- **`--dry-run`** wherever a command writes or uploads: it checks the arguments, prints what would
  be written where, with every setting, and exits 0 without loading a model.
- **Checked before anything loads.** What the arguments alone show (a missing path, a file where a
  folder belongs, a choice that is not one, an output that is not ours) is reported at once, before
  torch and transformers import. A name that can only be a local path (it ends in `.jsonl`, starts
  with `./`, `/` or `~`, or its first folder exists here, like `adapters/nope`) is never looked up on
  the Hub.
- **Recorded.** Every output folder gets `command.json`: the command as typed, every setting
  (defaults included) and the versions of qsimpo, Python, torch, transformers, peft, bitsandbytes and
  datasets, so the run can be read back and replayed. `qsimpo.json` and `eval.json` hold the same
  `versions`.

## Exit codes

| code | meaning |
|---|---|
| 0 | done (a `--dry-run` that found nothing wrong included) |
| 1 | a check that ran and failed: `plan` does not fit, a merge or GGUF file does not verify, training went non-finite |
| 2 | something typed or pointed at must change: arguments, config, data, paths, an output that is not ours, a refused merge or push; the message says what |
| 130 | interrupted (Ctrl-C or SIGTERM); training saves a checkpoint first and prints the command that resumes |

`--debug` (or `QSIMPO_DEBUG=1`) adds the traceback to an error.

## Why an in-house builder

The parsers are argparse, built by `qsimpo/grammar.py` from each command's function signature
(types, defaults, required) and a line of help per option. jsonargparse, tyro and pydantic-settings'
CLI were considered: each would import its own stack before the first check and report with its own
messages, while qsimpo's `--section.key VALUE` overrides keep YAML typing with text fields taken as
typed, collect every config problem into one message with `did you mean` hints, and must answer a
missing path in well under a second. The signature is read from the module's source, not imported,
so a wrong argument is reported before torch loads (a test checks it equals the imported
function's).
"""


def _default(value) -> str:
    if value is EMPTY:
        return "(required)"
    if value in (None, ()) or value == []:
        return ""
    return f"`{value}`"


def _flag(command: Command, opt) -> str:
    param = command.param(opt)
    if opt.positional:
        return f"`{opt.metavar or opt.param.upper()}`"
    value = "" if param.kind == "bool" else " {" + ",".join(map(str, opt.choices)) + "}" \
        if opt.choices and not opt.metavar else " " + metavar(opt, param)
    return f"`{opt.flags[0]}{value}`"


def command_section(command: Command) -> list[str]:
    lines = [f"## qsimpo {command.name}", "", command.description, "",
             "| option | default | meaning |", "|---|---|---|"]
    for opt in command.options:
        param = command.param(opt)
        default = "" if param.kind == "bool" else _default(param.default)
        if opt.required is False:
            default = ""
        meaning = opt.help.replace("%%", "%").replace("|", "\\|")
        lines.append(f"| {_flag(command, opt)} | {default} | {meaning} |")
    if command.dry_run:
        lines.append(f"| `--dry-run` |  | {DRY_RUN} |")
    if command.overwrite:
        lines.append(f"| `--overwrite` |  | {OVERWRITE} |")
    if command.overrides:
        lines.append("| `--section.key VALUE` |  | any config key ([config.md](config.md)) |")
    return lines + [""]


def renamed(commands: dict[str, Command]) -> list[str]:
    lines = ["## Earlier spellings", "", "They keep working (hidden from `--help`), or fail naming the new one.", "",
             "| command | earlier | now |", "|---|---|---|"]
    for command in commands.values():
        for opt in command.options:
            for old in opt.old:
                lines.append(f"| {command.name} | `{old}` | `{opt.flags[0]}` |")
        for old in command.retired:
            lines.append(f"| {command.name} | `{old}` | fails, naming its replacement |")
    return lines + [""]


def markdown() -> str:
    from qsimpo.cli import COMMANDS

    lines = [INTRO, "## Commands", ""]
    lines += [f"- [`qsimpo {name}`](#qsimpo-{name}): {c.summary}" for name, c in COMMANDS.items()] + [""]
    for command in COMMANDS.values():
        lines += command_section(command)
    lines += renamed(COMMANDS)
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
