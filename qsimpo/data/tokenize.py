"""One pair's texts -> token ids with an exact prompt/response boundary, one BOS, one end of turn, truncation.

``prompt_ids`` is the one way a row's prompt becomes ids: training (``tokenize_pair``) and every command that
answers a prompt (qsimpo.generate) call it, so the model is asked exactly what it was trained on.
"""

from __future__ import annotations

from qsimpo.data.formats import DataError
from qsimpo.data.render import render_pair, render_prompt, turn_end_id


def _encode(tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: the post-processor would add a BOS here and in front of every response.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_ids(tokenizer, text: str) -> list[int]:
    """A response's ids, ending once where the model's turn ends: at the template's end-of-turn token when it has
    one (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``; not the newline after it, and no EOS after it), else
    with the tokenizer's EOS appended."""
    ids = _encode(tokenizer, text)
    end = turn_end_id(tokenizer)
    if end is not None and end in ids:
        return ids[:len(ids) - ids[::-1].index(end)]
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def turn_end_token(tokenizer) -> int | None:
    """The token ``_response_ids`` ends a trained turn with: the template's end-of-turn token, else the EOS."""
    end = turn_end_id(tokenizer)
    return end if end is not None else tokenizer.eos_token_id


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` starting with exactly one BOS, when the tokenizer has one (the template may have rendered it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return list(ids)
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos] + list(ids[start:])


def prompt_ids(tokenizer, triple: dict, system_prompt: str | None = None) -> list[int]:
    """The token ids of a row's prompt ({"prompt", "format"}: a string, messages or an HH transcript), as training
    feeds them: rendered by ``render_prompt`` with ``system_prompt``, one BOS."""
    return with_bos(tokenizer, _encode(tokenizer, render_prompt(tokenizer, triple, system_prompt)))


def cut_prompt(tokenizer, ids: list[int], max_prompt_length: int) -> list[int]:
    """A prompt cut from the left to ``max_prompt_length`` tokens, keeping its BOS (the newest turns stay)."""
    if len(ids) <= max_prompt_length:
        return ids
    head = ids[:1] if tokenizer.bos_token_id is not None else []
    keep = max_prompt_length - len(head)
    return head + (ids[len(ids) - keep:] if keep > 0 else [])


def tokenize_pair(tokenizer, triple: dict, max_length: int, max_prompt_length: int,
                  system_prompt: str | None = None) -> dict | None:
    """Token ids of one pair; None if it cannot fit in max_length (the caller counts it as too_long).

    The prompt is ``prompt_ids``' (one BOS); each response ends once where the turn ends (``_response_ids``).
    Truncation only when prompt + longest response > max_length: the prompt is cut from the left
    to max_prompt_length (keeping the BOS), then responses from the right to the room left (a cut
    response loses its EOS). A response is never left empty.
    """
    prompt_text, chosen_text, rejected_text = render_pair(tokenizer, triple, system_prompt)
    prompt = with_bos(tokenizer, _encode(tokenizer, prompt_text))  # = prompt_ids(tokenizer, triple, system_prompt)
    if not prompt:
        raise DataError.bad_row(triple.get("location", "row"), "empty_text", "the prompt is empty and the tokenizer has no "
                                "BOS, so the first response token has nothing to be predicted from")
    chosen, rejected = _response_ids(tokenizer, chosen_text), _response_ids(tokenizer, rejected_text)
    prompt_truncated = response_truncated = False
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) > max_prompt_length:
            prompt, prompt_truncated = cut_prompt(tokenizer, prompt, max_prompt_length), True
        room = max_length - len(prompt)
        if room < 1:
            return None
        response_truncated = len(chosen) > room or len(rejected) > room
        chosen, rejected = chosen[:room], rejected[:room]
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "prompt_truncated": prompt_truncated, "response_truncated": response_truncated}


def format_pair(tokenizer, pair: dict) -> str:
    """A readable view of one tokenized pair, special tokens shown, with the prompt/response boundary marked."""
    def show(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    def pieces(ids):
        return " ".join(repr(show([i])) for i in ids)

    p = pair["prompt_ids"]
    cut = [w for w, flag in (("prompt cut from the left", pair.get("prompt_truncated")),
                             ("responses cut to fit max_length", pair.get("response_truncated"))) if flag]
    lines = [f"═══ {pair.get('location', 'pair')}{' (' + '; '.join(cut) + ')' if cut else ''} ═══",
             f"──── prompt ({len(p)} tokens, masked-out) ────", show(p)]
    for key in ("chosen", "rejected"):
        ids = pair[f"{key}_ids"]
        lines += [f"──── {key} response ({len(ids)} tokens, masked-in) ────", show(ids),
                  f"  boundary: … {pieces(p[-3:])} ┃ {pieces(ids[:3])} …   last: {pieces(ids[-2:])}"]
    return "\n".join(lines)
