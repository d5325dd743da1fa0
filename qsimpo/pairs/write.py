"""The output of `qsimpo pairs`: one row per prompt, appended as it is done, and what makes a rerun resume.

    FILE.jsonl                  the pairs, in the layout of the SimPO paper's data sets (``pair_row``)
    FILE.jsonl.dropped.jsonl    the prompts dropped, with why (``DROP_REASONS``) and their answers: a rerun does not redo them
    FILE.jsonl.settings.json    what the samples and scores depend on (model, scorer, n, sampling, seed, backend)

Every row is flushed and fsync'd before the next prompt is worked on, so a run cut short loses at most
the prompt in progress; a rerun with the same --out skips every prompt already written or dropped
(keyed by ``prompt_id``, a hash of the prompt's messages), and repairs a last line cut mid-write.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qsimpo.record import read_settings, write_settings
from qsimpo.errors import OutputExists, UsageError

DROP_REASONS = {
    "identical_samples": "every sampled answer is the same text: no preference to learn",
    "empty_samples": "fewer than two answers have any text",
    "tie": "the best and worst answers scored the same",
}


def prompt_id(messages: list[dict]) -> str:
    """The key of a prompt in the output and its sidecars: a sha256 of its messages."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def unusable(answers: list[str]) -> str | None:
    """Why a prompt's answers cannot make a pair before any scoring (a DROP_REASONS key), or None."""
    texts = [a for a in answers if a.strip()]
    if len(texts) < 2:
        return "empty_samples"
    return "identical_samples" if len(set(texts)) == 1 else None


def pair_row(messages: list[dict], answers: list[str], scores: list[float]) -> tuple[dict | None, str | None]:
    """(row, None), or (None, reason) for a tie. chosen/rejected are the best/worst scored answers with text.

    The row: prompt_id; prompt (a string when it is one user message, else the messages); chosen and
    rejected as the whole conversation ending in the answer; all_generations and all_rm_scores.
    """
    usable = [i for i, a in enumerate(answers) if a.strip()]
    best = max(usable, key=lambda i: scores[i])
    worst = min(usable, key=lambda i: scores[i])
    if scores[best] == scores[worst] or answers[best] == answers[worst]:  # equal text can score apart only by noise
        return None, "tie"
    single = len(messages) == 1 and messages[0]["role"] == "user"
    return {"prompt_id": prompt_id(messages), "prompt": messages[0]["content"] if single else messages,
            "chosen": messages + [{"role": "assistant", "content": answers[best]}],
            "rejected": messages + [{"role": "assistant", "content": answers[worst]}],
            "all_generations": answers, "all_rm_scores": scores}, None


def _append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_rows(path: Path, repair: bool = True) -> list[dict]:
    """The complete rows of a JSONL file this command wrote; a last line cut mid-write is left out (its prompt is
    redone), and removed from the file when ``repair``."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        if repair:
            with path.open("r+b") as f:
                f.truncate(len(data))
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:line {n} is not JSON ({e.msg}); this file cannot be resumed: pass another --out") from None
        if not isinstance(row, dict) or "prompt_id" not in row:
            raise UsageError(f"{path}:line {n} has no prompt_id: not a row of `qsimpo pairs`; pass another --out")
        rows.append(row)
    return rows


class PairsFile:
    """The output and its sidecars: what is done already, and appending what is done now."""

    def __init__(self, out: str | Path, settings: dict, writer: bool = True):
        """``writer`` False: keep the same account as the process that writes (under torchrun), touching no file."""
        self.writer = writer
        self.path = Path(out)
        self.dropped_path = Path(f"{out}.dropped.jsonl")
        self.settings_path = Path(f"{out}.settings.json")
        if self.settings_path.exists():
            before = read_settings(self.settings_path)
            before.setdefault("backend", "transformers")  # written before --backend existed: sampled with transformers
            changed = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in settings.items() if before.get(k) != v]
            if changed:
                raise OutputExists(f"{out} holds pairs made with other settings ({'; '.join(changed)}): rerun with the same "
                                   "settings to resume, or pass another --out")
        elif self.path.exists() and self.path.stat().st_size:
            raise OutputExists(f"{out} exists and was not written by `qsimpo pairs` (no {self.settings_path.name} beside "
                               "it): pass another --out")
        self.settings = settings
        self.scores = {row["prompt_id"]: row["all_rm_scores"] for row in _read_rows(self.path, repair=writer)}  # the pairs
        self.dropped = {row["prompt_id"]: row["reason"] for row in _read_rows(self.dropped_path, repair=writer)}
        self.written_now = 0

    def seen(self, key: str) -> bool:
        return key in self.scores or key in self.dropped

    def _start(self) -> None:
        """Record the settings with the first row or drop (a run that fails before any leaves nothing behind)."""
        if self.writer and not self.settings_path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_settings(self.settings_path, self.settings)  # with the versions, as every command's record

    def write(self, row: dict) -> None:
        self._start()
        if self.writer:
            _append(self.path, row)
        self.scores[row["prompt_id"]] = row["all_rm_scores"]
        self.written_now += 1

    def drop(self, key: str, reason: str, location: str, answers: list[str], scores: list[float] | None = None) -> None:
        """Record a dropped prompt with its answers (and scores, if it got that far), to see why it was dropped."""
        self._start()
        if self.writer:
            _append(self.dropped_path, {"prompt_id": key, "reason": reason, "location": location,
                                        "all_generations": answers, "all_rm_scores": scores})
        self.dropped[key] = reason

    def summary(self, prompts_read: int, repeated: int, left: int, cut: int) -> dict:
        """Counts over the whole file (every run that wrote it), and the line printed at the end."""
        gaps = [max(s) - min(s) for s in self.scores.values()]
        reasons = {r: 0 for r in DROP_REASONS}
        for reason in self.dropped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        out = {"out": str(self.path), "prompts_read": prompts_read, "pairs_written": len(self.scores),
               "pairs_written_now": self.written_now, "dropped": reasons, "repeated_prompts": repeated,
               "left_by_max_prompts": left, "answers_cut_at_max_new_tokens": cut,
               "mean_best_minus_worst": sum(gaps) / len(gaps) if gaps else None}
        why = ", ".join(f"{r} {n}" for r, n in reasons.items() if n)
        line = (f"pairs {self.path}: {prompts_read} prompts read, {len(self.scores)} pairs written ({self.written_now} this "
                f"run), {sum(reasons.values())} dropped{f' ({why})' if why else ''}")
        if repeated:
            line += f", {repeated} repeated prompts skipped"
        if left:
            line += f", {left} prompts left by --max-prompts"
        if cut:
            line += f"; {cut} answers this run reached --max-new-tokens"
        gap = out["mean_best_minus_worst"]
        out["line"] = line + (f"; mean best - worst score {gap:.4g}" if gap is not None else "")
        return out
