"""qsimpo's GGUF files run in llama.cpp itself: do its greedy answers match transformers' from the merged model?

    python benchmarks/bench_gguf_llamacpp.py                    # SmolLM2-135M-Instruct; trains an adapter first
    python benchmarks/bench_gguf_llamacpp.py --adapter DIR --record

llama.cpp comes prebuilt from npm, inside node-llama-cpp (no compiler, no llama.cpp checkout):

    npm install --prefix ~/.cache/qsimpo/node-llama-cpp --omit=optional --ignore-scripts \\
        node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1

found through --node-modules, $QSIMPO_NODE_LLAMA_CPP (a node_modules folder) or that prefix; without it the
script stops and says so. benchmarks/llamacpp_greedy.mjs drives it: the chat template stored in the GGUF file,
rendered and tokenized by llama.cpp's vocabulary, answered greedily until an end-of-generation token.

What runs, on the base (qsimpo.realmodel.smollm2_path() unless --base):
1. an adapter: bench_merge_dtype.train_adapter (NF4 base, LoRA r 16 α 32 on all linear layers, SimPO), unless
   --adapter;
2. ``merge(..., gguf=["lora"])``: the merged folder (dequantized NF4 base weights, float32, verified) and the
   adapter alone as NAME-LoRA-F32.gguf, read back and checked;
3. that merged folder as F16 and Q8_0 GGUF with qsimpo.export.gguf_out.write (the files ``--gguf f16 --gguf
   q8_0`` writes; its transformers read-back is measured in docs/merge-and-share.md and not repeated here);
4. the base folder as F16 GGUF, the same way, and a second merge into the original base weights (verify off):
   the adapter GGUF adds its update to the weights in that base file, so that merge is its transformers twin.

Compared, prompt by prompt (built-in chat prompts, not training data), token id by token id:

    llama.cpp                          transformers (float32, greedy, qsimpo.generate)
    merged F16                         the merged model
    merged Q8_0                        the merged model
    base F16 --lora adapter GGUF       the merge into the original base weights
    base F16                           the base (what the adapter changes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
NPM_PREFIX = Path.home() / ".cache" / "qsimpo" / "node-llama-cpp"
RUNNER = Path(__file__).with_name("llamacpp_greedy.mjs")


INSTALL = (f"npm install --prefix {NPM_PREFIX} --omit=optional --ignore-scripts node-llama-cpp@3.22.1 "
           "@node-llama-cpp/linux-x64@3.22.1")


def find_node_modules(given: str | None = None) -> Path | None:
    """The node_modules folder holding node-llama-cpp (``given``, $QSIMPO_NODE_LLAMA_CPP, then NPM_PREFIX's), with
    node on PATH; None without them (tests/export/test_gguf_llamacpp.py then skips)."""
    if shutil.which("node") is None:
        return None
    candidates = [given, os.environ.get("QSIMPO_NODE_LLAMA_CPP"), str(NPM_PREFIX / "node_modules")]
    return next((Path(c) for c in filter(None, candidates) if (Path(c) / "node-llama-cpp" / "package.json").is_file()),
                None)


def llama_cpp(modules: Path, model: Path, prompts: list[str], max_new: int, threads: int, lora: Path | None = None,
              work: Path = Path("/tmp")) -> dict:
    """llama.cpp's greedy answers to ``prompts`` from the GGUF file ``model`` (with the adapter GGUF ``lora``):
    llamacpp_greedy.mjs's JSON (prompt and answer token ids, answers, llama.cpp's release)."""
    request = work / f"request-{model.stem}{'-lora' if lora else ''}.json"
    request.write_text(json.dumps({"node_modules": str(modules), "model": str(model), "lora": str(lora) if lora else None,
                                   "prompts": prompts, "max_new_tokens": max_new, "threads": threads}))
    done = subprocess.run(["node", str(RUNNER), str(request)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp on {model.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def transformers_greedy(folder: Path, prompts: list[str], max_new: int, gguf_file: str | None = None) -> list[dict]:
    """transformers' greedy answers (float32) from a model folder, or from the GGUF file ``gguf_file`` in it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsimpo.generate import generate, prompt_ids

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"}, **kwargs).eval()
    out = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        new = generate(model, tokenizer, [ids], max_new)[0].ids  # without the stop token, as llama.cpp's runner stops
        out.append({"prompt_ids": ids, "answer_ids": new, "answer": tokenizer.decode(new, skip_special_tokens=True)})
    return out


def compare(name: str, ours: dict, reference: list[dict], files: dict[str, int]) -> dict:
    per = []
    for got, want in zip(ours["answers"], reference):
        same_prefix = next((i for i, (a, b) in enumerate(zip(got["answer_ids"], want["answer_ids"])) if a != b),
                           min(len(got["answer_ids"]), len(want["answer_ids"])))
        per.append({"prompt": got["prompt"], "prompt_ids_equal": got["prompt_ids"] == want["prompt_ids"],
                    "answer_equal": got["answer_ids"] == want["answer_ids"], "tokens_agreeing": same_prefix,
                    "llama_cpp": got["answer"], "transformers": want["answer"], "seconds": got["seconds"]})
    return {"run": name, "files": files, "matched": sum(p["answer_equal"] for p in per), "prompts": len(per),
            "prompt_ids_equal": all(p["prompt_ids_equal"] for p in per), "answers": per}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base model folder or .gguf file (default: qsimpo.realmodel.smollm2_path())")
    p.add_argument("--adapter", help="an adapter to export instead of training one")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pairs", type=int, default=120)
    p.add_argument("--prompts", type=int, default=4, help="built-in chat prompts to answer")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--node-modules", help="node_modules folder holding node-llama-cpp")
    p.add_argument("--out", default="/tmp/qsimpo-gguf-llamacpp")
    p.add_argument("--record", action="store_true", help="append the result to benchmarks/results.jsonl")
    args = p.parse_args()

    modules = find_node_modules(args.node_modules)
    if modules is None:
        sys.exit(f"llama.cpp not found: install node (apt-get install nodejs npm) and node-llama-cpp's prebuilt "
                 f"llama.cpp with\n  {INSTALL}\nor pass its node_modules folder with --node-modules")
    import peft
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from bench_merge_dtype import train_adapter
    from qsimpo.export.gguf_out import plan, write
    from qsimpo.export.merge import merge
    from qsimpo.export.verify import BUILTIN_PROMPTS
    from qsimpo.realmodel import smollm2_path
    from qsimpo.run_dir import read_meta
    from qsimpo.train.model import base_config, pretrained_source

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    base = args.base or str(smollm2_path())
    t0 = time.time()
    adapter = Path(args.adapter) if args.adapter else train_adapter(base, out, args.steps, args.lr, args.pairs)
    train_s = time.time() - t0
    resolved = pretrained_source(base_config(base, read_meta(adapter)))
    base_folder = Path(resolved.name_or_path)
    if not base_folder.is_dir():  # a Hub id: its files in the Hub cache
        from huggingface_hub import snapshot_download

        base_folder = Path(snapshot_download(resolved.name_or_path, revision=resolved.revision))

    merged, original = out / "smol", out / "smol-original"
    merge(str(adapter), merged, device="cpu", gguf=["lora"], log=print)
    merge(str(adapter), original, base_weights="original", verify=False, device="cpu", log=lambda *_: None)
    pl = plan(AutoConfig.from_pretrained(base_folder), AutoTokenizer.from_pretrained(base_folder), ["f16", "q8_0"])
    files = {kind: write(merged, merged / "gguf" / f"smol-{kind.upper()}.gguf", kind, pl, "smol") for kind in pl.types}
    files["base_f16"] = write(base_folder, out / "base-F16.gguf", "f16", pl, "base")
    lora = merged / "gguf" / "smol-LoRA-F32.gguf"
    sizes = {k: v.stat().st_size for k, v in files.items()} | {"lora": lora.stat().st_size}

    prompts = BUILTIN_PROMPTS[: args.prompts]
    ref_merged = transformers_greedy(merged, prompts, args.max_new_tokens)
    ref_original = transformers_greedy(original, prompts, args.max_new_tokens)
    ref_base = transformers_greedy(base_folder, prompts, args.max_new_tokens)
    runs, info = [], {}
    for name, model, with_lora, reference in (("merged F16", files["f16"], None, ref_merged),
                                              ("merged Q8_0", files["q8_0"], None, ref_merged),
                                              ("base F16 --lora adapter", files["base_f16"], lora, ref_original),
                                              ("base F16", files["base_f16"], None, ref_base)):
        got = llama_cpp(modules, model, prompts, args.max_new_tokens, args.threads, with_lora, out)
        info = {k: got[k] for k in ("llama_cpp", "node_llama_cpp", "build")}
        used = {Path(model).name: sizes[[k for k, v in files.items() if v == model][0]]}
        if with_lora:
            used[lora.name] = sizes["lora"]
        runs.append(compare(name, got, reference, used))
        if with_lora:  # the adapter on the base's 16-bit weights vs the default merge (into dequantized NF4)
            runs[-1]["equal_to_default_merge"] = sum(a["answer_ids"] == b["answer_ids"]
                                                     for a, b in zip(got["answers"], ref_merged))
        if name == "merged Q8_0":  # llama.cpp or the 8-bit rounding? transformers on the same dequantized Q8_0 weights
            same = transformers_greedy(model.parent, prompts, args.max_new_tokens, gguf_file=model.name)
            runs[-1]["equal_to_transformers_on_the_same_file"] = sum(a["answer_ids"] == b["answer_ids"]
                                                                     for a, b in zip(got["answers"], same))

    changed = sum(a["answer_ids"] != b["answer_ids"] for a, b in zip(ref_original, ref_base))
    print(f"\nllama.cpp {info['llama_cpp']['release']} (node-llama-cpp {info['node_llama_cpp']}, {info['build']}); "
          f"{len(prompts)} prompts, greedy, up to {args.max_new_tokens} tokens; the adapter changes "
          f"{changed}/{len(prompts)} of transformers' answers")
    for r in runs:
        print(f"{r['run']:<26} answers equal {r['matched']}/{r['prompts']}, prompt ids equal: {r['prompt_ids_equal']}, "
              f"files: {', '.join(f'{k} {v / 1e6:.1f} MB' for k, v in r['files'].items())}")
        if "equal_to_default_merge" in r:
            print(f"{'':<26} equal to the default merge's (dequantized NF4 base): {r['equal_to_default_merge']}/{r['prompts']}")
        if "equal_to_transformers_on_the_same_file" in r:
            print(f"{'':<26} equal to transformers reading the same file: "
                  f"{r['equal_to_transformers_on_the_same_file']}/{r['prompts']}")
        for a in r["answers"]:
            mark = "=" if a["answer_equal"] else f"≠ (first {a['tokens_agreeing']} tokens agree)"
            print(f"    {a['prompt']!r} {mark}\n      llama.cpp:    {a['llama_cpp']!r}\n      transformers: {a['transformers']!r}")
    row = {"bench": "gguf_llamacpp", "date": time.strftime("%Y-%m-%d"), "base": base, "adapter": str(adapter),
           "train_s": round(train_s, 1), "max_new_tokens": args.max_new_tokens, "adapter_changes_answers": changed,
           "runs": runs, "sizes": sizes, **info,
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers":
                        transformers.__version__, "peft": peft.__version__, "gguf": version("gguf"),
                        "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()},
           "command": f"node benchmarks/{RUNNER.name} REQUEST.json"}
    (out / "result.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"\nfull result: {out / 'result.json'}")
    if args.record:
        with open(Path(__file__).with_name("results.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
