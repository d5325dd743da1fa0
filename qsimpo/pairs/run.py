"""`qsimpo pairs`: on-policy preference pairs, the SimPO paper's recipe, from top to bottom.

    qsimpo pairs prompts.jsonl --model adapters/sft --scorer my_scorers:helpful --out pairs.jsonl

For each prompt, n answers are sampled from the policy (temperature 0.8, top-p 0.95 by default),
scored, and the best becomes chosen, the worst rejected. Prompts whose answers are all the same,
have no text, or tie on score are dropped and counted. ``qsimpo train`` reads the output as it is.
"""

from __future__ import annotations

import dataclasses
import time

from qsimpo.console import is_main, say
from qsimpo.data.formats import FIXES
from qsimpo.errors import UsageError


def _check(n: int, temperature: float, top_p: float, max_new_tokens: int, max_prompts: int | None, batch_size: int) -> None:
    problems = []
    if n < 2:
        problems.append(f"--num-samples {n}: a pair needs at least 2 answers per prompt (the paper samples 5)")
    if not temperature > 0:
        problems.append(f"--temperature {temperature}: answers at temperature 0 are all the same; give a temperature > 0 "
                        "(the paper uses 0.8)")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p {top_p}: give a probability in (0, 1] (the paper uses 0.95)")
    for flag, value in (("--max-new-tokens", max_new_tokens), ("--max-prompts", max_prompts), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            problems.append(f"{flag} {value}: give a whole number >= 1")
    if problems:
        raise UsageError("; ".join(problems))


# The data pipeline speaks of training pairs and config keys; here they are prompts and flags.
_WORDS = (("set data.on_bad_row: skip to train on", "pass --on-bad-row skip to answer"),
          ("data.on_bad_row: skip", "--on-bad-row skip"), ("nothing was trained", "nothing was sampled"),
          ("no usable pairs", "no usable prompts"), ("check data.path", "check PROMPTS"), ("data.split", "--split"),
          ("data.subset", "--subset"),
          (FIXES["missing_key"], "each row needs a prompt, or chosen and rejected to take it from; name a prompt column of "
                                 "another name with --prompt-column (e.g. --prompt-column instruction)"))


def read_prompts(prompts: str, split: str, subset: str | None, on_bad_row: str, prompt_column: str | None = None):
    """(prompts as [(prompt_id, messages, location)], the data summary): every row judged as training judges rows."""
    from qsimpo.config import DataConfig
    from qsimpo.data import DataError, prompt_messages, read_source
    from qsimpo.pairs.write import prompt_id

    cfg = DataConfig(path=prompts, split=split, subset=subset, on_bad_row=on_bad_row,
                     columns={"prompt": prompt_column} if prompt_column else None)
    try:
        source = read_source(cfg, prompts=True)
    except DataError as e:  # the data pipeline's message, in this command's words
        message = str(e)
        for theirs, ours in _WORDS:
            message = message.replace(theirs, ours)
        raise DataError(message, e.reason, e.location) from None
    texts = source.texts()
    source.summary.kept = len(texts)
    return [(prompt_id(m), m, t["location"]) for t in texts for m in [prompt_messages(t)]], source.summary


def make_pairs(prompts: str, model: str, scorer: str, out: str, n: int = 5, temperature: float = 0.8, top_p: float = 0.95,
               max_new_tokens: int = 1024, max_prompts: int | None = None, seed: int = 0, batch_size: int = 4,
               split: str = "train", subset: str | None = None, prompt_column: str | None = None, base: str | None = None,
               on_bad_row: str = "error", backend: str = "auto", system_prompt: str | None = None,
               trust_remote_code: bool = False, device: str | None = None) -> dict:
    """Sample ``n`` answers per prompt from ``model``, score them with ``scorer``, append best-vs-worst rows to ``out``.

    ``backend``: ``transformers`` (``generate``, the base in 4 bits), ``vllm`` (qsimpo.pairs.vllm_backend) or ``auto``
    (vLLM where it imports and a CUDA GPU is visible). The backend used is recorded with the settings.
    ``system_prompt``: the system message the prompts are rendered with; by default an adapter's recorded
    ``data.system_prompt`` and none for a base model (training renders its rows with the config's ``data.system_prompt``:
    give the same one here, and the answers are sampled on the very prompt training shows).
    Returns the summary (``PairsFile.summary``); its line is printed at the end.
    """
    from tqdm.auto import tqdm

    from qsimpo.pairs.scorers import load_scorer
    from qsimpo.pairs.shard import Processes
    from qsimpo.pairs.vllm_backend import resolve_backend
    from qsimpo.pairs.write import PairsFile
    from qsimpo.train.model import device_for_rank

    _check(n, temperature, top_p, max_new_tokens, max_prompts, batch_size)
    settings = {"model": model, "base": base, "scorer": scorer, "n": n, "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "system_prompt": system_prompt}
    items, data = read_prompts(prompts, split, subset, on_bad_row, prompt_column)  # bad data stops here, before any model loads
    main = is_main()  # under torchrun / accelerate launch, process 0 speaks for all
    if data.bad_rows and main:
        say(data.report())
    settings["backend"] = resolve_backend(backend, model, base, say=say if main else None)  # answers differ by backend
    unique, keys = [], set()
    for item in items:
        if item[0] not in keys:
            keys.add(item[0])
            unique.append(item)
    repeated = len(items) - len(unique)
    left = max(0, len(unique) - max_prompts) if max_prompts else 0
    unique = unique[:max_prompts] if max_prompts else unique
    procs = Processes()  # under torchrun / accelerate launch: each process its share, process 0 writes
    try:
        file = PairsFile(out, settings, writer=procs.main)  # an output of other settings stops here
        device = device or device_for_rank()
        score = load_scorer(scorer, device, trust_remote_code=trust_remote_code)  # a bad scorer stops before the policy
        file.scores, file.dropped = procs.share((file.scores, file.dropped))  # what process 0 read in --out
        todo = [item for item in unique if not file.seen(item[0])]
        cut = 0
        if todo:
            draw = _sampler(settings["backend"], model, base, device, seed, trust_remote_code, system_prompt)
            bar = tqdm(total=len(todo), desc="pairs", unit="prompt", dynamic_ncols=True, disable=not procs.main)
            t0, n_tokens = time.perf_counter(), 0
            for part in procs.chunks(todo, batch_size):
                done, (tokens, part_cut) = procs.exchange(*_answer_and_score(part, draw, score, n, temperature, top_p,
                                                                             max_new_tokens, seed))
                n_tokens, cut = n_tokens + tokens, cut + part_cut
                for _, (key, messages, location), answers, scored, row, reason in done:
                    if row is not None:
                        file.write(row)
                    else:
                        file.drop(key, reason, location, answers, scored)
                bar.update(len(done))
                bar.set_postfix({"tok/s": f"{n_tokens / (time.perf_counter() - t0):.1f}", "pairs": file.written_now,
                                 "scored/s": f"{score.scored / max(score.seconds, 1e-9):.1f}"}, refresh=False)
            bar.close()
        procs.finish()
    finally:
        procs.close()
    summary = file.summary(len(items), repeated, left, cut)
    summary["data"] = dataclasses.asdict(data)
    summary["judge_cut"] = score.cut_line()  # prompts or answers too long for the judge, cut as its own code cuts
    if summary["judge_cut"]:
        summary["line"] += f"; {summary['judge_cut']}"
    if main:
        say(summary["line"])
    return summary


def _sampler(backend: str, model: str, base: str | None, device: str, seed: int, trust_remote_code: bool,
             system_prompt: str | None = None):
    """The policy loaded by ``backend``, as a function (prompts, prompt ids, n, temperature, top_p, max_new_tokens,
    seed) -> (n answers per prompt, tokens generated, answers cut at max_new_tokens)."""
    if backend == "vllm":
        from qsimpo.pairs.vllm_backend import load_vllm

        return load_vllm(model, base, seed, trust_remote_code, system_prompt)
    from qsimpo.generate import recorded_system_prompt
    from qsimpo.pairs import sample

    policy, tokenizer, _ = sample.load_policy(model, base, device, trust_remote_code)
    # an adapter's prompts are rendered with the system prompt it was trained with, as training on the pairs will;
    # a base model's with the one given (--system-prompt: the data.system_prompt the training config will use)
    if system_prompt is None and hasattr(policy, "peft_config"):
        system_prompt = recorded_system_prompt(model)
    return lambda *args: sample.sample(policy, tokenizer, *args, system_prompt=system_prompt)


def _answer_and_score(part: list, draw, score, n: int, temperature: float, top_p: float, max_new_tokens: int,
                      seed: int) -> tuple[list, int, int]:
    """This process's part of a chunk, answered (by ``draw``, see ``_sampler``) and scored: ([(index, item, answers,
    scores, row, drop reason)], tokens generated, answers cut at max_new_tokens)."""
    from qsimpo.pairs.write import pair_row, unusable

    if not part:
        return [], 0, 0
    items = [item for _, item in part]
    answers, tokens, cut = draw([m for _, m, _ in items], [k for k, _, _ in items], n, temperature, top_p, max_new_tokens,
                                seed)
    ready = [(item, a) for item, a in zip(items, answers) if not unusable(a)]
    flat = [(m, loc, text) for (_, m, loc), a in ready for text in a]
    scores = score([m for m, _, _ in flat], [t for _, _, t in flat], [loc for _, loc, _ in flat],
                   [len(a) for _, a in ready]) if flat else []  # each prompt's answers together (PairRM ranks them)
    per_prompt = iter(scores[j * n:(j + 1) * n] for j in range(len(ready)))
    results = []
    for (index, item), a in zip(part, answers):
        reason, row, scored = unusable(a), None, None
        if reason is None:
            scored = next(per_prompt)
            row, reason = pair_row(item[1], a, scored)
        results.append((index, item, a, scored, row, reason))
    return results, tokens, cut
