"""The one command grammar: every `qsimpo COMMAND` parser is built from the typed signature of the function it calls.

A command names its function as ``"module:function"`` and lists, for each parameter a user may set,
its help text (and, where the name alone does not say it, its flag, choices or a path check). The
rest comes from the signature: the value's type (``int``, ``float``, ``str``, ``bool`` as a switch,
``list[str]`` as a repeatable option, or as a positional taking one value or more), its default (shown
in help and docs/cli.md) and whether it is required. The signature is read from the module's source
with ``ast``, not by importing it: the command modules import torch, transformers and peft (3-15 s),
and a misspelled path or a wrong choice is reported before that, in well under a second.
tests/test_cli.py checks that what is read equals ``inspect.signature`` of the imported function, so
the two cannot drift.

Options left out are not passed (the function's default applies); ``--dry-run`` and ``--overwrite``
are added by the command line where the function has none. An old spelling keeps working
(``old=``, hidden from help) or, when its meaning changed, fails naming the new one (``retired``).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qsimpo.errors import QsimpoError, UsageError

EMPTY = object()  # a parameter without a default: required
UNREAD = object()  # a default the source does not spell as a constant (e.g. ``log=print``): not settable on the command line
PACKAGE = Path(__file__).resolve().parent
_BUILDERS = {"frozenset": frozenset, "tuple": tuple}


# ------------------------------------------------------------------------------------------ signatures
@functools.lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    if module.partition(".")[0] != "qsimpo":  # not ours: found the usual way (finding a submodule imports its package)
        return ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    parts = module.split(".")[1:]
    path = PACKAGE.joinpath(*parts).with_suffix(".py") if parts else PACKAGE / "__init__.py"
    if not path.is_file():
        path = PACKAGE.joinpath(*parts, "__init__.py")
    return ast.parse(path.read_text(), str(path))


def constant(target: str) -> Any:
    """The value of a module-level constant ``"module:NAME"`` as its source spells it (a literal, or a name bound to one)."""
    module, name = target.split(":")
    return _value(ast.Name(name), module)


def _value(node: ast.expr, module: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        for stmt in _tree(module).body:
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == node.id for t in targets):
                    return _value(stmt.value, module)
            if isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.module.startswith("qsimpo"):
                for alias in stmt.names:
                    if (alias.asname or alias.name) == node.id:
                        return _value(ast.Name(alias.name), stmt.module)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _BUILDERS and len(node.args) == 1:
        inner = _value(node.args[0], module)
        return UNREAD if inner is UNREAD else _BUILDERS[node.func.id](inner)
    return UNREAD


@dataclass(frozen=True)
class Param:
    name: str
    annotation: str  # as written in the source, e.g. "int | None"
    default: Any  # EMPTY: required; UNREAD: not a constant

    @property
    def kind(self) -> str:
        """bool, int, float, list or str: how the command line reads the value."""
        names = {t.strip() for t in self.annotation.split("|")} - {"None", ""}
        for kind in ("bool", "int", "float"):
            if names == {kind}:
                return kind
        return "list" if any(n.startswith(("list[", "tuple[")) for n in names) else "str"


@functools.lru_cache(maxsize=None)
def signature(target: str) -> dict[str, Param]:
    """The parameters of the function ``"module:function"``, read from its source (see the module doc)."""
    module, name = target.split(":")
    fn = next((n for n in _tree(module).body if isinstance(n, ast.FunctionDef) and n.name == name), None)
    if fn is None:
        raise LookupError(f"{module} defines no function {name}")
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = {}
    for arg, default in [*zip(positional, defaults), *zip(a.kwonlyargs, a.kw_defaults)]:
        value = EMPTY if default is None else _value(default, module)
        params[arg.arg] = Param(arg.arg, ast.unparse(arg.annotation) if arg.annotation else "", value)
    return params


def load(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------ options
@dataclass
class Opt:
    """One parameter on the command line; ``param`` names it in the function (``to`` renames it per function)."""

    param: str
    help: str
    flag: str | None = None  # default: --param-with-dashes; None for a positional when ``positional``
    positional: bool = False
    choices: tuple | None = None
    metavar: str | None = None
    check: Callable[[str, str], None] | None = None  # (value, flag) -> raises; runs before anything heavy imports
    old: tuple[str, ...] = ()  # earlier spellings that keep working (hidden from help)
    to: dict[str, str] = field(default_factory=dict)  # function target -> its parameter name, when not ``param``
    convert: Callable[[str], Any] | None = None
    required: bool | None = None  # False: never required by the parser (the command's check decides)

    @property
    def flags(self) -> list[str]:
        return [self.flag or "--" + self.param.replace("_", "-")]


DRY_RUN = "print what would be written, and where, with every setting; load and write nothing"
OVERWRITE = "write into --out although it holds files qsimpo does not write there (they may be replaced)"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as UsageError (exit 2, printed once by qsimpo.cli) rather than exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def metavar(opt: Opt, param: Param) -> str:
    """What help shows for the value: N for a whole number, X for a number, else the option's name."""
    return opt.metavar or {"int": "N", "float": "X"}.get(param.kind) or opt.flags[0].lstrip("-").replace("-", "_").upper()


def default_text(default: Any) -> str:
    if default in (EMPTY, UNREAD, None, False, True, ()) or default == []:
        return ""
    return f" (default: {default})"


@dataclass
class Command:
    """A command: its functions (``targets``; the first, unless ``choose`` picks another), options and checks."""

    name: str
    summary: str  # one line, for `qsimpo --help`
    description: str
    targets: tuple[str, ...]
    options: list[Opt]
    dry_run: bool = False  # add --dry-run (the function has none): the command line prints the plan
    overwrite: bool = False  # add --overwrite (the function has none): lets check() write into a used --out
    retired: dict[str, str] = field(default_factory=dict)  # old flag -> message naming what replaced it
    check: Callable[[dict, dict], None] | None = None  # (settings, given) -> raises, before heavy imports
    choose: Callable[[dict], int] | None = None  # settings -> index into targets
    overrides: bool = False  # the rest of the arguments are a training config's --section.key VALUE overrides
    epilog: str | None = None

    def param(self, opt: Opt) -> Param:
        for target in self.targets:
            found = signature(target).get(opt.to.get(target, opt.param))
            if found is not None:
                return found
        raise KeyError(f"qsimpo {self.name}: no function of {', '.join(self.targets)} takes {opt.param!r}")

    @functools.cached_property
    def parser(self) -> Parser:
        epilog = self.epilog
        if self.overrides:
            from qsimpo.config_docs import help_text

            epilog = "Overrides (--section.key VALUE), one per config field:\n" + help_text()
        p = Parser(prog=f"qsimpo {self.name}", description=textwrap.fill(self.description, 100), epilog=epilog,
                   argument_default=argparse.SUPPRESS, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
        for opt in self.options:
            param = self.param(opt)
            if param.default is UNREAD:
                raise ValueError(f"qsimpo {self.name}: the default of {param.name} is not a constant the command line can show")
            kw: dict[str, Any] = {"help": opt.help + default_text(param.default)}
            if opt.positional:
                names = [opt.param]
                kw["metavar"] = opt.metavar or opt.param.upper()
            else:
                names = opt.flags
                kw["dest"] = opt.param
                if param.kind != "bool" and (opt.metavar or not opt.choices):  # choices show themselves: {a,b}
                    kw["metavar"] = metavar(opt, param)
                if param.default is EMPTY and opt.required is not False:
                    kw["required"] = True
            if param.kind == "bool":
                kw["action"] = "store_false" if param.default is True else "store_true"
            else:
                if param.kind == "list" and opt.positional:  # one or more values: `qsimpo eval A B C`
                    kw["nargs"] = "+"
                elif param.kind == "list":
                    kw["action"] = "append"
                kw["type"] = opt.convert or {"int": int, "float": float}.get(param.kind, str)
                if opt.choices:
                    kw["choices"] = opt.choices
            p.add_argument(*names, **kw)
            for old in opt.old:  # the same option under an earlier name
                p.add_argument(old, **{**kw, "help": argparse.SUPPRESS, "required": False} if not opt.positional else kw)
        if self.dry_run:
            p.add_argument("--dry-run", action="store_true", help=DRY_RUN)
        if self.overwrite:
            p.add_argument("--overwrite", action="store_true", help=OVERWRITE)
        for old, message in self.retired.items():
            p.add_argument(old, nargs="?", action=_Retired, message=message, help=argparse.SUPPRESS)
        return p

    def flag_of(self, param: str, argv: list[str]) -> str:
        """The spelling the user typed for ``param`` (its first flag when they typed none), for messages."""
        opt = next(o for o in self.options if o.param == param)
        if opt.positional:
            return param
        spellings = [*opt.flags, *opt.old]
        return next((a.partition("=")[0] for a in argv if a.partition("=")[0] in spellings), opt.flags[0])

    def parse_args_only(self, argv: list[str]) -> dict:
        """The options given, as the parser reads them, before any check (for tests and tools)."""
        return vars(self.parser.parse_known_args(argv)[0] if self.overrides else self.parser.parse_args(argv))

    def parse(self, argv: list[str]) -> tuple[dict, dict]:
        """(the options given, every setting: given ones over the functions' defaults); path checks done."""
        if self.overrides:
            namespace, rest = self.parser.parse_known_args(argv)
            given = {**vars(namespace), "overrides": rest}
        else:
            given = vars(self.parser.parse_args(argv))
        problems = []  # every argument's problem, said together
        for opt in self.options:
            if opt.check and given.get(opt.param) is not None:
                values = given[opt.param] if isinstance(given[opt.param], list) else [given[opt.param]]
                for value in values:
                    try:
                        opt.check(value, self.flag_of(opt.param, argv))
                    except QsimpoError as e:
                        problems.append(e)
        if problems:
            raise type(problems[0])("; ".join(map(str, problems)))
        settings = {o.param: given.get(o.param, self.param(o).default) for o in self.options  # in the options' order
                    if o.param in given or self.param(o).default is not EMPTY}
        settings.update(given)
        for extra, added in (("dry_run", self.dry_run), ("overwrite", self.overwrite)):
            if added:
                settings.setdefault(extra, False)
        if self.check:
            self.check(settings, given)  # it may fill in a default it resolves (eval: --out), for both
        return given, settings

    def call(self, given: dict, settings: dict, **extra):
        """Import the chosen function and call it with the options given (renamed for it) and ``extra``."""
        target = self.targets[self.choose(settings) if self.choose else 0]
        params = signature(target)
        kwargs, wrong = {}, []
        for opt in self.options:
            if opt.param in given:
                name = opt.to.get(target, opt.param)
                if name in params:
                    kwargs[name] = given[opt.param]
                else:
                    wrong.append(opt.flags[0])
        if wrong:
            raise UsageError(f"{', '.join(wrong)} do{'es' * (len(wrong) == 1)} not apply to this form of qsimpo {self.name} "
                             f"(see qsimpo {self.name} --help)")
        for name in ("dry_run", "overwrite", "overrides"):
            if name in given and name in params:
                kwargs[name] = given[name]
        return load(target)(**kwargs, **extra)


class _Retired(argparse.Action):
    """An option that was replaced: using it fails with the message naming the new spelling (and the value given)."""

    def __init__(self, *args, message: str, **kw):
        super().__init__(*args, **kw)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise UsageError(self.message.format(value=values if values is not None else "VALUE"))
