"""Sampling for `qsimpo pairs` with vLLM (``--backend vllm``, or ``auto`` where vLLM imports and a CUDA GPU is visible).

vLLM loads the base in its own dtype (bf16/fp16 as the checkpoint says): its current releases have no
in-flight 4-bit loading like qsimpo's NF4, so this path samples from the 16-bit base, and an adapter runs
through vLLM's LoRA support on it. It shares qsimpo.generate with the transformers backend: prompts go in
as the token ids ``prompt_ids`` renders (as training renders them, after an adapter's recorded system prompt),
vLLM stops at the same ``stop_ids``, and answers are cut and decoded by the same ``finish``. Each prompt is one request with its own seed,
``sample_seed(seed, prompt, 0)``, and ``n`` answers, so its answers do not depend on the other prompts of a
call or on where a run resumed. One process on the first visible GPU (set CUDA_VISIBLE_DEVICES to pick another):
under torchrun / accelerate launch the backend is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

BACKENDS = ("auto", "transformers", "vllm")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _base_config(model: str, base: str | None, trust_remote_code: bool = False):
    """(the base's ModelConfig, the adapter or None): an adapter's recorded base (or ``base``), else ``model`` itself."""
    from qsimpo.load import model_config

    return model_config(model, base, trust_remote_code)


def _why_not(model: str, base: str | None) -> tuple[str | None, bool]:
    """(why vLLM cannot sample here, or None; whether ``auto`` should say so: only where vLLM and a GPU are there)."""
    import torch

    if not torch.cuda.is_available():
        return ("vLLM samples on a CUDA GPU and none is visible here; pass --backend transformers (or auto) to sample "
                "with transformers"), False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed: pip install vllm (on this CUDA machine), or pass --backend transformers", False
    except Exception as e:  # installed, but broken here (a CUDA or torch it was not built for)
        return f"vLLM does not import here ({type(e).__name__}: {e}); pass --backend transformers", True
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return ("the vLLM backend runs in one process (it batches over the whole GPU itself), not under torchrun / "
                "accelerate launch: run `qsimpo pairs` once without them, or pass --backend transformers to share the "
                "prompts among the processes"), True
    from qsimpo.gguf_in import is_gguf

    cfg, _ = _base_config(model, base)
    if is_gguf(cfg):
        return (f"a .gguf base ({cfg.name_or_path}) is not supported by the vLLM backend; pass a transformers model folder "
                "or Hub id, or --backend transformers"), True
    return None, False


def resolve_backend(backend: str, model: str, base: str | None = None, say=print) -> str:
    """The backend that samples: ``transformers`` or ``vllm``. ``auto`` takes vLLM where it can run, and says why not
    where vLLM is installed on a CUDA machine but cannot take this run; ``vllm`` where it cannot run is a UsageError."""
    from qsimpo.errors import UsageError

    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "transformers":
        return backend
    why, worth_saying = _why_not(model, base)
    if why is None:
        return "vllm"
    if backend == "vllm":
        raise UsageError(f"--backend vllm: {why}")
    if worth_saying and say is not None:
        say(f"pairs: sampling with transformers, not vLLM: {why.split('; ')[0]}")
    return "transformers"


def lora_rank(adapter: Path) -> int:
    """The smallest max_lora_rank vLLM accepts that holds every rank of the adapter."""
    from qsimpo.errors import UsageError

    config = json.loads((adapter / "adapter_config.json").read_text())
    rank = max([int(config.get("r") or 8), *map(int, (config.get("rank_pattern") or {}).values())])
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise UsageError(f"{adapter}: LoRA rank {rank} is above the largest vLLM serves ({LORA_RANKS[-1]}); pass "
                     "--backend transformers")


def _adapter_folder(adapter: str) -> Path:
    local = Path(adapter).expanduser()
    if local.is_dir():
        return local.resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(adapter))


class VllmPolicy:
    """The policy as a vLLM engine: ``policy(prompts, prompt_ids, n, temperature, top_p, max_new_tokens, seed)``
    returns what ``sample`` returns: (n answers per prompt, tokens generated, answers cut at max_new_tokens)."""

    def __init__(self, llm, tokenizer, stops: list[int], lora=None, system_prompt: str | None = None):
        self.llm, self.tokenizer, self.stops, self.lora, self.system_prompt = llm, tokenizer, stops, lora, system_prompt

    def requests(self, prompts: list[list[dict]], prompt_ids: list[str], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> tuple[list, list]:
        """(the prompts as token-id prompts, one SamplingParams per prompt seeded by the prompt)."""
        from vllm import SamplingParams, TokensPrompt

        from qsimpo.generate import prompt_ids as render
        from qsimpo.pairs.sample import sample_seed

        inputs = [TokensPrompt(prompt_token_ids=render(self.tokenizer, p, self.system_prompt)) for p in prompts]
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 seed=sample_seed(seed, key, 0), stop_token_ids=list(self.stops), detokenize=False)
                  for key in prompt_ids]
        return inputs, params

    def __call__(self, prompts: list[list[dict]], prompt_ids: list[str], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> tuple[list[list[str]], int, int]:
        from qsimpo.generate import finish

        inputs, params = self.requests(prompts, prompt_ids, n, temperature, top_p, max_new_tokens, seed)
        outputs = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora)
        answers, n_tokens, cut = [], 0, 0
        for out in outputs:
            mine = [finish(self.tokenizer, c.token_ids, self.stops) for c in sorted(out.outputs, key=lambda c: c.index)]
            n_tokens += sum(len(a.ids) for a in mine)
            cut += sum(not a.stopped for a in mine)
            answers.append([a.text for a in mine])
        return answers, n_tokens, cut


def load_vllm(model: str, base: str | None = None, seed: int = 0, trust_remote_code: bool = False,
              system_prompt: str | None = None) -> VllmPolicy:
    """A base model (Hub id or folder) in its own dtype, or an adapter through vLLM's LoRA on its recorded base; prompts
    rendered with ``system_prompt``, by default the adapter's recorded one."""
    import torch
    from transformers import GenerationConfig
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from qsimpo.generate import recorded_system_prompt, stop_ids
    from qsimpo.load import base_source
    from qsimpo.train.model import load_tokenizer

    cfg, adapter = _base_config(model, base, trust_remote_code)
    cfg = base_source(cfg, "--model")  # a held copy, or the Hub cache while the Hub is out of reach
    tokenizer = load_tokenizer(cfg)
    try:
        generation = GenerationConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone ends an answer
        generation = None
    kwargs = dict(model=cfg.name_or_path, revision=cfg.revision, dtype="auto", seed=seed,
                  trust_remote_code=trust_remote_code)
    if torch.cuda.is_initialized():  # a reward model scorer may hold part of the GPU already: take 90% of what is free
        free, total = torch.cuda.mem_get_info()
        kwargs["gpu_memory_utilization"] = round(0.9 * free / total, 3)
    lora = None
    if adapter is not None:
        folder = _adapter_folder(adapter)
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank(folder))
        lora = LoRARequest("qsimpo-policy", 1, str(folder))
    llm = LLM(**kwargs)
    if system_prompt is None:
        system_prompt = recorded_system_prompt(adapter)
    return VllmPolicy(llm, tokenizer, stop_ids(tokenizer, generation), lora, system_prompt)
