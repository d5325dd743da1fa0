"""A merged model as one GGUF file, for llama.cpp, Ollama and LM Studio: written in Python with gguf-py.

    qsimpo merge adapters/run --out merged/run --gguf q8_0            # merged/run/gguf/run-Q8_0.gguf
    qsimpo merge adapters/run --out merged/run --gguf f16 --gguf q4_0

No llama.cpp build: the tensors are renamed to llama.cpp's names, quantized by gguf-py's own
(numpy) quantizers and streamed into the file one at a time, beside the metadata llama.cpp reads:
hyperparameters, the byte-level BPE vocabulary with its merges and pre-tokenizer name, BOS/EOS/PAD,
the chat template and the sampling defaults of ``generation_config.json``. Two things decide
whether a file answers like the model it came from, and both are checked here before anything is
written: the architecture (llama.cpp's Llama attention expects Q and K rows permuted; Qwen2 keeps
them and adds biases) and the tokenizer (llama.cpp re-implements each pre-tokenizer by name, so a
tokenizer whose splitting rule has no name it knows would silently tokenize differently).
qsimpo.export.gguf_check then reads the file back through transformers' GGUF loader and compares.

Supported: Llama, Mistral, Qwen2, Gemma 2 and text-only Gemma 3 (qsimpo.export.gguf_arch), with byte-level BPE
or sentencepiece-style tokenizers (qsimpo.export.gguf_vocab); anything else is refused up front.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qsimpo.export.gguf_arch import ARCHITECTURES, NOT_YET, arch_metadata, arch_notes, rope_factors
from qsimpo.export.gguf_errors import GGUFCheckFailed, GGUFError
from qsimpo.export.gguf_vocab import SPLIT_NAMES, pre_tokenizer, write_vocab  # noqa: F401 (re-exported)

# --gguf TYPE -> (gguf-py quantization type name, llama.cpp file type name, bits per weight, block size).
# Every type here is one gguf-py can quantize and transformers' GGUF loader can read back (so it is verified).
TYPES = {
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
}


@dataclass
class Plan:
    """What a GGUF export of one model will write, decided before anything is written."""
    arch: str  # GGUF architecture name
    permute_qk: bool
    pre: str  # tokenizer.ggml.pre, or gguf_vocab.SPM for a sentencepiece-style vocabulary
    types: list[str]  # --gguf values, lower case
    notes: list[str] = field(default_factory=list)  # what the file does differently from transformers, if anything


def parse_types(types) -> list[str]:
    wanted = [t.lower() for t in types]
    bad = [t for t in wanted if t not in TYPES]
    if bad:
        raise GGUFError(f"--gguf {', '.join(bad)}: not a type qsimpo writes; choose from {', '.join(TYPES)} "
                        "(other llama.cpp types: write f16, then run llama.cpp's llama-quantize on it)")
    return list(dict.fromkeys(wanted))


def plan(config, tokenizer, types) -> Plan:
    """Refuse an architecture, tokenizer or type the export cannot write faithfully; else what it will write."""
    types = parse_types(types)
    model_type = getattr(config, "model_type", None)
    if model_type in NOT_YET:
        raise GGUFError(f"GGUF export of {model_type} models is not supported yet ({NOT_YET[model_type]}): merge "
                        "without --gguf and convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    if model_type not in ARCHITECTURES:
        raise GGUFError(f"GGUF export of {model_type!r} models is not supported (qsimpo writes "
                        f"{', '.join(ARCHITECTURES)}): merge without --gguf and use llama.cpp's convert_hf_to_gguf.py")
    notes = arch_notes(config)  # raises GGUFError for settings llama.cpp cannot run as transformers does
    arch, permute = ARCHITECTURES[model_type]
    return Plan(arch, permute, pre_tokenizer(tokenizer), types, notes)


# ------------------------------------------------------------------------------------------- metadata
def write_metadata(writer, config, tokenizer, generation: dict, name: str, pl: Plan, qtype: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, TYPES[qtype][1])))
    if qtype not in ("f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch_metadata(writer, config, pl.arch)
    writer.add_vocab_size(config.vocab_size)
    write_vocab(writer, tokenizer, config.vocab_size, pl.pre, generation)
    if generation.get("do_sample"):  # llama.cpp's defaults for this model, as the model's authors set them
        for key, add in (("temperature", writer.add_sampling_temp), ("top_p", writer.add_sampling_top_p),
                         ("top_k", writer.add_sampling_top_k), ("repetition_penalty", writer.add_sampling_penalty_repeat)):
            if generation.get(key) is not None:
                add(generation[key])


# ------------------------------------------------------------------------------------------- tensors
def tensor_names(config, arch: str):
    """transformers tensor name -> llama.cpp's (None for one it has no name for), from gguf-py's map for ``arch``:
    the one mapping the merged model's file and the adapter's (qsimpo.export.gguf_lora) share."""
    import gguf

    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch),
                                     config.num_hidden_layers)
    return lambda key: names.get_name(key, try_suffixes=(".weight", ".bias"))


def llama_rows(key: str, rows, config, permute_qk: bool, inverse: bool = False):
    """``rows`` (the weight ``key`` of a transformers model, or a LoRA B of it: output rows first) in llama.cpp's
    order: Q and K rows interleaved per head where the architecture needs it (convert_hf_to_gguf.py's permute:
    HF keeps each head's rotary halves apart), else unchanged. ``inverse``: back to transformers' order."""
    if not permute_qk or not key.endswith(("q_proj.weight", "k_proj.weight")):
        return rows
    heads = config.num_attention_heads
    if key.endswith("k_proj.weight"):
        heads = getattr(config, "num_key_value_heads", None) or heads
    split = (heads, rows.shape[0] // heads // 2, 2) if inverse else (heads, 2, rows.shape[0] // heads // 2)
    return rows.reshape(*split, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _tensors(folder: Path, config, pl: Plan, load: bool = True):
    """(GGUF name, shape, float32 numpy array or None) for every weight of the merged folder, in llama.cpp's
    layout, one at a time (``load=False``: names and shapes only, nothing read)."""
    from safetensors import safe_open

    gguf_name = tensor_names(config, pl.arch)
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                    continue  # llama.cpp reuses token_embd for a tied output head
                new = gguf_name(key)
                if new is None:
                    raise GGUFError(f"{shard.name}: no llama.cpp name for the tensor {key}")
                if not load:
                    yield new, tuple(f.get_slice(key).get_shape()), None
                    continue
                data = llama_rows(key, f.get_tensor(key).float().numpy(), config, pl.permute_qk)
                if pl.arch.startswith("gemma") and key.endswith("norm.weight"):
                    data = data + 1.0  # llama.cpp's Gemma RMSNorm multiplies by w where transformers' does by 1 + w
                yield new, data.shape, data
    factors = rope_factors(config)
    if factors is not None:  # Llama 3.1/3.2's rope scaling, as llama.cpp reads it
        yield "rope_freqs.weight", factors.shape, (factors if load else None)


def _ggml_type(name: str, shape: tuple, qtype: str):
    """The ggml type a tensor is stored in: 1-D tensors stay F32 as llama.cpp keeps them; the embedding and output
    head of a 4-bit file are Q8_0 (llama-quantize would give them 6 bits; gguf-py cannot write Q6_K); a row that is
    not whole blocks cannot be quantized and is F16 (llama.cpp falls back the same way)."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    target = TYPES[qtype][0]
    if len(shape) == 1:
        return T.F32
    if target in ("Q4_0", "Q4_1") and name in ("token_embd.weight", "output.weight"):
        target = "Q8_0"
    gtype = T[target]
    if gtype not in (T.F32, T.F16) and shape[-1] % GGML_QUANT_SIZES[gtype][0]:
        return T.F16
    return gtype


def write(folder: str | Path, out: str | Path, qtype: str, pl: Plan, name: str | None = None) -> Path:
    """Write the merged transformers folder ``folder`` as the GGUF file ``out`` (of type ``qtype``), streaming tensors."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quant_shape_to_byte_shape, quantize
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder, out = Path(folder), Path(out)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(folder).to_dict()
    except OSError:
        generation = {}
    writer = gguf.GGUFWriter(None, pl.arch)
    write_metadata(writer, config, tokenizer, generation, name or folder.name, pl, qtype)
    # The header lists every tensor's type and size before any data: pass 1 reads shapes only, pass 2
    # converts and writes one tensor at a time, so memory holds one tensor, not the model.
    for key, shape, _ in _tensors(folder, config, pl, load=False):
        gtype = _ggml_type(key, shape, qtype)
        if gtype in (T.F32, T.F16):
            dtype = np.float32 if gtype == T.F32 else np.float16
            writer.add_tensor_info(key, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
        else:
            raw = quant_shape_to_byte_shape(shape, gtype)
            writer.add_tensor_info(key, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=gtype)
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for key, shape, data in _tensors(folder, config, pl):
        writer.write_tensor_data(quantize(np.ascontiguousarray(data), _ggml_type(key, shape, qtype)))
    writer.close()
    return out


# ------------------------------------------------------------------------------------------- Ollama
def ollama_template(tokenizer) -> str | None:
    """The chat template as an Ollama Go template (.System/.Prompt/.Response), derived by rendering the Jinja one.

    Marker strings are rendered in place of a system prompt, a user message and an answer; the text around
    them is the template. None when the template does not render one turn that way (nothing to derive).
    """
    S, P, R = "\x01SYSTEM\x01", "\x01PROMPT\x01", "\x01ANSWER\x01"

    def render(messages, generation_prompt):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    try:
        alone = render([{"role": "user", "content": P}], True)
        answered = render([{"role": "user", "content": P}, {"role": "assistant", "content": R}], False)
    except Exception:
        return None
    if alone.count(P) != 1 or answered.count(R) != 1:
        return None
    before, after = alone.split(P)
    turn_end = answered.split(R)[1]
    if tokenizer.bos_token and before.startswith(tokenizer.bos_token) and _adds_bos(tokenizer):
        before = before[len(tokenizer.bos_token):]  # llama.cpp adds BOS itself (add_bos_token), as this tokenizer does
    head = before
    try:
        with_system = render([{"role": "system", "content": S}, {"role": "user", "content": P}], True)
    except Exception:
        with_system = ""
    if with_system.count(S) == 1 and with_system.count(P) == 1 and with_system.endswith(P + after):
        sys_before, sys_mid = with_system[: -len(P + after)].split(S)
        if tokenizer.bos_token and sys_before.startswith(tokenizer.bos_token) and _adds_bos(tokenizer):
            sys_before = sys_before[len(tokenizer.bos_token):]
        head = f"{{{{ if .System }}}}{sys_before}{{{{ .System }}}}{sys_mid}{{{{ else }}}}{before}{{{{ end }}}}"
    text = f"{head}{{{{ .Prompt }}}}{after}{{{{ .Response }}}}{turn_end}"
    return None if '"""' in text else text


def _adds_bos(tokenizer) -> bool:
    return bool(tokenizer.bos_token) and tokenizer("hello").input_ids[:1] == [tokenizer.get_vocab().get(tokenizer.bos_token)]


def modelfile(gguf_name: str, tokenizer, generation: dict) -> str:
    """An Ollama Modelfile for the GGUF file ``gguf_name`` beside it: template, stop tokens, sampling defaults."""
    model = Path(gguf_name).stem
    lines = [f"# ollama create {model.lower()} -f {model}.Modelfile && ollama run {model.lower()}",
             f"FROM ./{gguf_name}"]
    template = ollama_template(tokenizer)
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    eos = generation.get("eos_token_id")
    ids = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    stops = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(i) for i in ids]
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if generation.get("do_sample"):
        for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                          ("repetition_penalty", "repeat_penalty")):
            if generation.get(key) is not None:
                lines.append(f"PARAMETER {name} {generation[key]}")
    else:
        lines.append("PARAMETER temperature 0")  # the model's generation config asks for greedy decoding
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the export
def export(folder: str | Path, pl: Plan, name: str | None = None, merged=None, log=print) -> list[dict]:
    """Write, read back and check one GGUF file per type of ``pl`` under ``folder/gguf/``, each with its JSON
    record and Ollama Modelfile. ``merged``: the merged model already in memory (else loaded from ``folder``).
    Raises GGUFError, after removing what it wrote, when a file does not answer like the merged model."""
    import shutil
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from qsimpo.record import versions
    from qsimpo.export.gguf_check import check, held_out_probes
    from qsimpo.export.verify import next_token_logprobs
    from qsimpo.gguf_in import sha256

    folder = Path(folder)
    name = name or folder.name
    out_dir = folder / "gguf"
    out_dir.mkdir(exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(folder).to_dict()
    except OSError:
        generation = {}
    if merged is None:
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"})
    merged = merged.eval()
    for note in pl.notes:
        log(f"note: {note}")
    probes, source = held_out_probes(merged, tokenizer)
    reference = next_token_logprobs(merged, probes)
    records = []
    try:
        for qtype in pl.types:
            path = out_dir / f"{name}-{TYPES[qtype][0]}.gguf"
            log(f"writing {path.name} ({TYPES[qtype][0]}, {pl.arch}, pre-tokenizer {pl.pre})")
            start = time.time()
            write(folder, path, qtype, pl, name)
            written = time.time() - start
            report = check(path, qtype, merged, tokenizer, probes, source, reference)
            for line in report.lines():
                log(line)
            if not report.passed:
                raise GGUFCheckFailed(f"{path.name} does not answer like the merged model ({'; '.join(report.problems)}); "
                                "nothing was kept. Try a larger type (f16 or q8_0) or report the model's architecture")
            digest = sha256(path)
            record = {"gguf_file": path.name, "type": TYPES[qtype][0], "bytes": path.stat().st_size, "sha256": digest,
                      "architecture": pl.arch, "tokenizer_pre": pl.pre, "notes": pl.notes, "from": name, "modelfile": f"{path.stem}.Modelfile",
                      "seconds": {"write": round(written, 1), "check": round(time.time() - start - written, 1)},
                      "check": report.to_dict(), "versions": versions("gguf")}
            (out_dir / f"{path.stem}.json").write_text(json.dumps(record, indent=2) + "\n")
            (out_dir / f"{path.stem}.Modelfile").write_text(modelfile(path.name, tokenizer, generation))
            log(f"  {path.stat().st_size / 1e6:.1f} MB in {written:.0f} s; Ollama: {path.stem}.Modelfile")
            records.append(record)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return records
