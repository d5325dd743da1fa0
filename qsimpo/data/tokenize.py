"""One pair's texts -> token ids with an exact prompt/response boundary, one BOS, one EOS, truncation."""

from __future__ import annotations

from qsimpo.data.formats import DataError
from qsimpo.data.render import render_pair


def _encode(tokenizer, text: str) -> list[int]:
    # add_special_tokens=False: the post-processor would add a BOS here and in front of every response.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_ids(tokenizer, text: str) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token):
        # The template already closed the turn (e.g. "<|im_end|>\n"): end at EOS, not at EOS + newline.
        return _encode(tokenizer, text.rstrip())
    ids = _encode(tokenizer, text)
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def tokenize_pair(tokenizer, triple: dict, max_length: int, max_prompt_length: int,
                  system_prompt: str | None = None) -> dict | None:
    """Token ids of one pair; None if it cannot fit in max_length (the caller counts it as too_long).

    The prompt starts with exactly one BOS (when the tokenizer has one: the template may have
    rendered it, the post-processor is not asked to add another); each response ends with one EOS.
    Truncation only when prompt + longest response > max_length: the prompt is cut from the left
    to max_prompt_length (keeping the BOS), then responses from the right to the room left (a cut
    response loses its EOS). A response is never left empty.
    """
    prompt_text, chosen_text, rejected_text = render_pair(tokenizer, triple, system_prompt)
    prompt = _encode(tokenizer, prompt_text)
    bos = tokenizer.bos_token_id
    if bos is not None:
        while prompt and prompt[0] == bos:
            prompt = prompt[1:]
        prompt = [bos] + prompt
    if not prompt:
        raise DataError.bad_row(triple.get("location", "row"), "empty_text", "the prompt is empty and the tokenizer has no "
                                "BOS, so the first response token has nothing to be predicted from")
    chosen, rejected = _response_ids(tokenizer, chosen_text), _response_ids(tokenizer, rejected_text)
    prompt_truncated = response_truncated = False
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) > max_prompt_length:
            head = prompt[:1] if bos is not None else []
            keep = max_prompt_length - len(head)
            prompt = head + (prompt[len(prompt) - keep:] if keep > 0 else [])
            prompt_truncated = True
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
