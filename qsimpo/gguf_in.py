"""A GGUF file as the base model: converted once into a cached transformers folder, then loaded like any other.

    model:
      name_or_path: models/SmolLM2-135M-Instruct.Q4_1.gguf    # a .gguf file
    # or the folder (or Hub repo) that holds it, and the file's name:
      name_or_path: models/smollm2
      gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf

transformers reads GGUF by dequantizing every tensor on load, but will not ``save_pretrained`` such
a model, and bitsandbytes quantizes to NF4 from a regular checkpoint. So the first use converts:
config, float32 safetensors (which hold exactly the values transformers dequantized) and tokenizer
go into ``$QSIMPO_CACHE/gguf/<sha256 prefix>/`` (default ``~/.cache/qsimpo/gguf/``), written to a
temporary folder and renamed into place, so a folder there is always complete. Every later load
(training, eval, merge, demo) reads that folder. The key is the file's content, not its path: a
moved or renamed file finds its conversion, an edited one is converted anew, and an adapter's
``qsimpo.json`` can keep recording the path the user gave.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import NoReturn

from qsimpo.config import ModelConfig
from qsimpo.errors import InputNotFound, UsageError

MAGIC = b"GGUF"
KEY_CHARS = 16  # hex digits of the sha256 that name a conversion: 64 bits, no collisions in one cache
SOURCE_RECORD = "gguf_source.json"


def cache_root() -> Path:
    """qsimpo's cache folder: ``$QSIMPO_CACHE``, else ``~/.cache/qsimpo``."""
    return Path(os.environ.get("QSIMPO_CACHE") or Path.home() / ".cache" / "qsimpo").expanduser()


def is_gguf(cfg: ModelConfig) -> bool:
    return bool(cfg.gguf_file) or cfg.name_or_path.lower().endswith(".gguf")


def resolve(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` as from_pretrained should read it: a GGUF source becomes its converted folder, anything else is unchanged."""
    if not is_gguf(cfg):
        return cfg
    return dataclasses.replace(cfg, name_or_path=str(converted(locate(cfg))), gguf_file=None, revision=None)


def locate(cfg: ModelConfig) -> Path:
    """The GGUF file on this disk: the path itself, a file in a local folder, or a download from a Hub repo."""
    where = Path(cfg.name_or_path).expanduser()
    if not cfg.gguf_file:
        path = where
    elif where.is_dir():
        path = where / cfg.gguf_file
    else:
        from qsimpo.data import looks_local

        if looks_local(cfg.name_or_path):
            raise InputNotFound(f"model.name_or_path = {cfg.name_or_path!r}: no such folder (model.gguf_file = "
                                f"{cfg.gguf_file!r} is looked for inside it): point it at the folder that holds the file")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(cfg.name_or_path, cfg.gguf_file, revision=cfg.revision))
        except Exception as e:  # offline, no such repo or file, gated: all say the same to the user
            raise InputNotFound(f"could not fetch {cfg.gguf_file} from the Hub repo {cfg.name_or_path} ({e}); check "
                                "the repo id and file name, the network, and HF_TOKEN for gated repos, or download the "
                                "file and set model.name_or_path to its path") from None
    if not path.is_file():
        what = "is a folder: name the .gguf file inside it with model.gguf_file" if path.is_dir() else "does not exist"
        raise InputNotFound(f"GGUF file {path} {what}")
    return path


def converted(path: Path) -> Path:
    """The cached transformers folder of the GGUF file ``path``, converting it on first use."""
    path = Path(path)
    _check_magic(path)
    digest = sha256(path)
    folder = cache_root() / "gguf" / digest[:KEY_CHARS]
    if not (folder / SOURCE_RECORD).is_file():  # written last, inside the folder renamed into place
        check(path)
        convert(path, folder, digest)
    return folder


def _check_magic(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        if MAGIC.startswith(head):  # an empty or few-byte file: a download cut off at once
            _truncated(path, "it ends inside the 4-byte magic number")
        raise UsageError(f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}. model.name_or_path takes "
                         "a .gguf file, a transformers model folder or a Hub id; if this should be GGUF, download it again")


def _truncated(path: Path, detail: str) -> NoReturn:
    raise UsageError(f"{path} is a truncated or damaged GGUF file ({path.stat().st_size:,} bytes; {detail}): "
                     "download it again (a partial download leaves such a file), then retry")


def check(path: Path) -> None:
    """Raise UsageError unless ``path`` is a whole GGUF file: header, metadata and every tensor's bytes present."""
    from gguf import GGUFReader

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except Exception:  # the reader fails on a cut-off file with numpy reshape/index errors that say nothing useful
        _truncated(path, "its metadata or tensor table is cut short")
    if not reader.tensors:
        _truncated(path, "it lists no tensors")
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > size:
        _truncated(path, f"its tensors need {end:,} bytes")


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from tqdm.auto import tqdm

    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=size, desc=f"hashing {Path(path).name}", unit="B", unit_scale=True,
                                      leave=False, disable=size < 2**30) as bar:
        while chunk := f.read(2**22):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def sha256(path: Path) -> str:
    """The file's sha256, computed once per process for a file that has not changed since."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def convert(path: Path, folder: Path, digest: str) -> None:
    """Write the GGUF file ``path`` as a transformers folder at ``folder`` (atomically: temp folder, then rename)."""
    from tqdm.auto import tqdm

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with tqdm(total=3, desc=f"converting {path.name} (once)", unit="step", leave=False) as bar:
            tokenizer = _tokenizer(path)
            bar.update()
            model = _plain_model(path)
            bar.update()
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_record(tmp, path, digest)
            bar.update()
        del model
        if folder.is_dir() and not (folder / SOURCE_RECORD).is_file():  # not renamed into place by this code
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / SOURCE_RECORD).is_file():  # not a concurrent conversion of the same file that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    except (ValueError, KeyError, NotImplementedError) as e:  # an architecture or tokenizer transformers cannot read
        raise UsageError(f"transformers cannot read the tokenizer in {path} ({e}); use a transformers model folder "
                         "or Hub id of the same model instead") from None


def _plain_model(path: Path):
    """The GGUF model as a regular float32 transformers model, with no quantization config attached.

    A GGUF-loaded model carries transformers' GGUF quantizer, which refuses ``save_pretrained``; the
    same state dict in a model built from the same config saves normally. The model is built on the
    meta device and takes the loaded tensors as they are (``assign``): no second copy, no random init.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(gguf_file=str(path))
    try:
        config = AutoConfig.from_pretrained(str(path.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UsageError(f"transformers cannot load the model in {path} ({e}); use a transformers model folder "
                         "or Hub id of the same model instead") from None
    config.name_or_path = path.name  # what the folder came from, instead of the GGUF's general.name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign replaced the lm_head parameter: tie it to the embedding again
    for name, buffer in loaded.named_buffers():  # non-persistent ones (rotary frequencies) are not in the state dict
        if name not in state:
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module)._buffers[leaf] = buffer
    return model


def _write_record(folder: Path, path: Path, digest: str) -> None:
    from qsimpo.record import versions

    record = {"gguf_file": path.name, "sha256": digest, "bytes": path.stat().st_size, "dtype": "float32",
              "versions": versions("gguf")}
    (folder / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
