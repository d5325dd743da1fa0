"""Chat templates for base models that ship none, and the one rule for which template a run uses.

``model.chat_template`` names a template shipped here (``chatml``, ``gemma``, ``llama3``, ``zephyr``), a path to
a Jinja file, or is the Jinja text itself. A run records the resolved text in its qsimpo.json and
writes it into the adapter's tokenizer files, so every later command renders prompts exactly as
the adapter was trained on them, even where the base model has no template of its own.
"""

from __future__ import annotations

from pathlib import Path

from qsimpo.errors import UsageError

HERE = Path(__file__).parent
SHIPPED = tuple(sorted(p.stem for p in HERE.glob("*.jinja")))


class NoChatTemplate(UsageError):
    """A base model with no chat template, and none named."""


def template_text(value: str) -> str:
    """The Jinja text ``model.chat_template`` stands for: a shipped name, a file, or the text itself."""
    if value in SHIPPED:
        return (HERE / f"{value}.jinja").read_text()
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    raise UsageError(f"model.chat_template = {value!r} is neither a template qsimpo ships ({', '.join(SHIPPED)}) nor a "
                     "Jinja file: name one of those, or give the path of a .jinja file")


def sft_adapter_template(sft_adapter: str) -> str | None:
    """The template the SFT adapter was trained with, as its qsimpo.json records it (None: it records none)."""
    from qsimpo.run_dir import read_meta

    return read_meta(sft_adapter).get("chat_template")


def apply_template(tokenizer, cfg) -> None:
    """Set ``tokenizer.chat_template`` from a ModelConfig: model.chat_template wins, then the SFT adapter's record,
    then the base tokenizer's own template."""
    value = getattr(cfg, "chat_template", None)
    if value:
        tokenizer.chat_template = template_text(value)
    elif getattr(cfg, "sft_adapter", None):
        recorded = sft_adapter_template(cfg.sft_adapter)
        if recorded:
            tokenizer.chat_template = recorded


def require_template(tokenizer, model_name: str, command: str) -> None:
    """A clear stop where a chat template is needed and the base has none and none was named."""
    if tokenizer.chat_template:
        return
    raise NoChatTemplate(
        f"{model_name} has no chat template, and `{command}` needs one to render conversations: name one with "
        f"--model.chat_template NAME (shipped: {', '.join(SHIPPED)}; zephyr ends each turn with the base's own EOS, which "
        "a LoRA adapter learns to stop at, where a family's turn tokens are often untrained in its base) or a path to "
        "a .jinja file; the adapter keeps it, so every later command uses the same one")
