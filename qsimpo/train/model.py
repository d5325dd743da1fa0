"""Base model (NF4 / int8 / unquantized) + LoRA. The only module that touches bitsandbytes.

NF4 follows the QLoRA recipe: 4-bit NormalFloat with double quantization, the compute dtype
bf16 where the hardware has it. On a machine with no GPU the same path runs on bitsandbytes'
CPU backend, in fp32 compute.
"""

from __future__ import annotations

import os

import torch

from qsimpo.console import warn
from qsimpo.config import LoraConfig, ModelConfig
from qsimpo.errors import InputNotFound


def device_for_rank() -> str:
    """The device this process trains on: its local GPU under torchrun/accelerate, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def compute_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # bf16 matmuls on most CPUs are emulated and slow


def quantization_config(cfg: ModelConfig, dtype: torch.dtype):
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,  # lets FSDP shard the packed weights like any other parameter
    )


def pretrained_source(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with name_or_path as from_pretrained reads it (qsimpo.load: a GGUF file becomes its cached conversion,
    a Hub id qsimpo holds or the Hub cache holds its local copy)."""
    from qsimpo.load import base_source

    return base_source(cfg)


def _unloadable(cfg: ModelConfig, e: OSError) -> InputNotFound:
    return InputNotFound(f"model.name_or_path = {cfg.name_or_path!r} could not be loaded ({e}); point it at a local "
                         "model folder (config.json, tokenizer and weights) or a Hub model id you can reach (check "
                         "the name, the network, and HF_TOKEN for gated models)")


def load_model_config(cfg: ModelConfig):
    """The base's transformers config (the text model's, for a multimodal one), read without its weights."""
    from transformers import AutoConfig

    source = pretrained_source(cfg)  # a .gguf base is read through its cached conversion
    try:
        config = AutoConfig.from_pretrained(source.name_or_path, revision=source.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise _unloadable(source, e) from None
    return getattr(config, "text_config", config)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    from qsimpo.templates import apply_template

    named, cfg = cfg, pretrained_source(cfg)

    try:
        tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:  # transformers' one error for "not a folder, not a reachable Hub repo, not a model"
        raise _unloadable(cfg, e) from None
    if tok.pad_token_id is None:  # Llama-3 and others ship none; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    apply_template(tok, named)  # model.chat_template, or the one an adapter was trained with (qsimpo.templates)
    return tok


def load_base(cfg: ModelConfig, device: str | None = None):
    """The frozen base model, quantized as configured, on this process's device."""
    cfg = pretrained_source(cfg)
    from transformers import AutoModelForCausalLM

    device = device or device_for_rank()
    dtype = compute_dtype(cfg.compute_dtype, device)
    kwargs = dict(revision=cfg.revision, quantization_config=quantization_config(cfg, dtype), dtype=dtype,
                  device_map={"": device}, trust_remote_code=cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, attn_implementation=cfg.attn_implementation, **kwargs)
    except ValueError as e:
        # sdpa, the default, is refused by a few architectures (Gemma 2 in transformers 5): eager computes the same
        # attention and takes the same masks, so an adapter trained with either loads for eval, merge and the demo.
        if cfg.attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        warn(f"model.attn_implementation sdpa: {cfg.name_or_path} has no sdpa attention in transformers; using eager")
        model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, attn_implementation="eager", **kwargs)
    model.config.use_cache = False
    if torch.device(device).type == "cpu":
        keep_training_layout(model)
    return model


def keep_training_layout(model) -> None:
    """Keep bitsandbytes' 4-bit layers on the CPU on the kernel training uses, in eval mode too.

    On CPUs with AVX512-BF16, a ``Linear4bit``'s first forward in eval mode without gradients repacks
    its weight in place into a layout for a fused bf16 kernel. That repack assumes in_features is a
    multiple of the 64-wide quantization block and crashes otherwise (``shape '[512, 21]' is invalid
    for input of size 11008`` on an MLP 1376 wide); it computes in bf16 whatever the compute dtype, so
    eval would score differently from training; and it has no backward, so training steps after an
    in-run evaluation would backpropagate through it. Every forward here dequantizes and multiplies,
    as training does.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the flag Linear4bit.forward checks before repacking


def add_lora(model, cfg: LoraConfig, quantized: bool, gradient_checkpointing: bool | int, seed: int | None = None):
    """Wrap ``model`` with trainable LoRA adapters; everything else stays frozen.

    ``gradient_checkpointing``: recompute every decoder layer (True), none (False), or that many of them (an int,
    train.gradient_checkpointing: auto as qsimpo.train.plan sizes it)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # checkpointing is enabled below, under transformers' current name (peft calls the deprecated one)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing is not False and gradient_checkpointing != 0:
        layers = None if gradient_checkpointing is True else int(gradient_checkpointing)
        enable_activation_checkpointing(model, {"use_reentrant": False}, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        torch.manual_seed(seed)  # LoRA A init
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def enable_activation_checkpointing(model, kwargs: dict, layers: int | None = None) -> None:
    """Recompute activations in the backward pass (transformers 5 renamed this from gradient checkpointing):
    in every decoder layer, or in the first ``layers`` of them only.

    transformers' decoder layers are GradientCheckpointingLayer modules, each recomputed when its own
    ``gradient_checkpointing`` flag is set (its documented switch); its ``every_n_layers`` can only pick
    every n-th layer, so a split of k of L layers sets the flags here."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if layers is not None:
        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i < layers


def base_config(base: str, meta: dict, **kwargs) -> ModelConfig:
    """The base an adapter's qsimpo.json (``meta``) records, as a ModelConfig: its revision and GGUF file go with the
    recorded base only, never with another one given by --base."""
    recorded = base == meta.get("base_model")
    return ModelConfig(name_or_path=base, revision=meta.get("base_model_revision") if recorded else None,
                       gguf_file=meta.get("base_model_gguf_file") if recorded else None,
                       chat_template=meta.get("chat_template"), **kwargs)


def load_trained(adapter: str, base: str | None = None, quantization: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False):
    """(model, tokenizer): the adapter on its base, quantized as it was trained. ``adapter`` is a folder or a Hub id."""
    from peft import PeftModel

    from qsimpo.load import base_model
    from qsimpo.run_dir import read_meta, record_dir

    meta = read_meta(record_dir(adapter))  # a checkpoint-N's base is its run's
    base = base_model(adapter, base, meta)
    cfg = base_config(base, meta, quantization=quantization or meta.get("quantization", "nf4"),
                      trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    model = PeftModel.from_pretrained(load_base(cfg, device), adapter)
    from qsimpo.train.stack import load_sft_side

    load_sft_side(model, adapter, meta)  # a run on top of `qsimpo sft`: its SFT adapter too, the SFT side of eval/demo
    model.eval()
    return model, tokenizer


def dequantize_base(model, dtype: torch.dtype):
    """A freshly loaded 4-bit/8-bit base as a plain model of ``dtype``, in place: every bitsandbytes
    Linear becomes an ``nn.Linear`` holding exactly the values the quantized layer multiplies by,
    i.e. the weights a QLoRA adapter was trained against (not the original 16-bit ones).

    A base from ``load_base`` is never repacked (see keep_training_layout); one loaded otherwise must be
    dequantized before its first inference forward pass: on CPUs with AVX512-BF16, bitsandbytes repacks
    4-bit weights in place on the first eval-mode forward, and the repacked data no longer dequantizes
    to the same matrix.
    """
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                raise RuntimeError(f"{name}: the 4-bit weights were repacked for the CPU by an inference forward pass "
                                   "and can no longer be dequantized exactly; dequantize a freshly loaded base")
            weight = bnb.functional.dequantize_4bit(module.weight.data, state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            scale = module.state.SCB if module.state.SCB is not None else module.weight.SCB  # a forward moves it to state
            weight = bnb.functional.int8_vectorwise_dequant(module.weight.data, scale)
        else:
            continue
        dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        dense.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
        if module.bias is not None:
            dense.bias = torch.nn.Parameter(module.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, dense)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # drops config.quantization_config, so save_pretrained writes a plain model
        quantizer.remove_quantization_config(model)
    model.is_loaded_in_4bit = model.is_loaded_in_8bit = False
    return model.to(dtype)
