"""The config schema as text: ``--help``'s list of overrides and docs/config.md, both generated from the pydantic
schema in qsimpo/config.py (tests/test_config.py keeps docs/config.md current)."""

from __future__ import annotations

from typing import Any

import yaml

from qsimpo.config import _BOUNDS, SECTIONS, _type_name

REQUIRED = ("model.name_or_path", "data.path")


def field_docs() -> list[tuple[str, str, Any, str]]:
    """(dotted name, type name with its bounds, default, doc) for every field, in schema order."""
    out = []
    for section, cls in SECTIONS.items():
        for name, info in cls.__pydantic_fields__.items():
            out.append((f"{section}.{name}", _type_name(info.annotation) + _bounds(info), info.get_default(call_default_factory=True),
                        info.description))
    return out


def _bounds(info) -> str:
    marks = [f"{op} {getattr(m, name)}" for m in info.metadata for name, op in _BOUNDS.items() if hasattr(m, name)]
    return f", {', '.join(marks)}" if marks else ""


def help_text() -> str:
    """Every field with its type, default and doc, grouped by section (for --help)."""
    lines = []
    current = None
    for name, tp, default, doc in field_docs():
        section = name.split(".")[0]
        if section != current:
            lines.append(f"\n{section}:")
            current = section
        lines.append(f"  --{name} ({tp}, default {default!r})\n      {doc}")
    return "\n".join(lines)


def markdown_reference() -> str:
    """docs/config.md: every field with its type, default and doc, generated from the schema (a test keeps it current)."""
    lines = ["# Configuration reference", "",
             "Generated from the schema in `qsimpo/config.py` by `python -m qsimpo.config_docs > docs/config.md`; `qsimpo train --help` "
             "prints the same. Every field can be set in the YAML under its section or on the command line with its "
             "dotted name (`--data.max_length 256`).", "",
             "| key | type | default | meaning |", "|---|---|---|---|"]
    for name, tp, default, doc in field_docs():
        shown = "(required)" if default == "" and name in REQUIRED else f"`{yaml.safe_dump(default).strip().removesuffix('...').strip()}`"
        lines.append(f"| `{name}` | {tp.replace(' | ', ' or ')} | {shown} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_reference(), end="")
