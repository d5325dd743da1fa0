"""Demo votes → preference rows that `qsimpo train` reads, appended to a JSONL file one fsync'd line at a time.

A "left better" / "right better" vote is a conversational (TRL-style) preference row:

    {"prompt": [{"role": "system"|"user"|"assistant", "content": ...}, ..., {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": <preferred answer>}],
     "rejected": [{"role": "assistant", "content": <other answer>}],
     "vote": "left" | "right",
     "left": {"model", "response", "tokens", "avg_logprob": {"left", "right"}}, "right": {...},
     "settings": {"temperature", "top_p", "max_new_tokens", "seed", "system_prompt"}, "time": ISO-8601}

A "tie" or "both bad" vote is the same row without chosen/rejected: it is kept (it is data about
the two models) but carries no preference, so qsimpo.formats counts it as dropped
(``no_preference``) instead of training on it or stopping on it.

In a multi-turn chat each side answered its own history, so the two prompts differ after the
first turn; the row's prompt is then the preferred side's history (the conversation the user
endorsed), and each side's own history is kept under left/right "prompt".
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from qsimpo.data.formats import NO_PREFERENCE_VOTES

VOTES_FILE = "votes.jsonl"  # the default votes file's name (beside the adapter folder)
VOTES = {"left": "left better", "right": "right better", "tie": "tie", "both_bad": "both bad"}


def vote_row(vote: str, turn: dict) -> dict:
    """The JSONL row for ``vote`` on ``turn`` = {"left": side, "right": side, "settings": {...}}.

    Each side is {"model", "prompt" (the messages it answered), "response", "tokens", "avg_logprob"}.
    Raises ValueError for a vote the file could not train on (identical or empty answers).
    """
    if vote not in VOTES:
        raise ValueError(f"vote = {vote!r} must be one of {', '.join(VOTES)}")
    left, right = turn["left"], turn["right"]
    winner = None if vote in NO_PREFERENCE_VOTES else vote  # the votes qsimpo.formats counts as no_preference
    if winner:
        loser = "right" if winner == "left" else "left"
        if left["response"].strip() == right["response"].strip():
            raise ValueError("the two answers are identical, so neither can be preferred: vote 'tie'")
        if not (left["response"].strip() and right["response"].strip()):
            raise ValueError("one answer is empty, which a training pair cannot hold: vote 'both bad' or 'tie'")
    row: dict = {"prompt": list(turn[winner or "left"]["prompt"])}
    if winner:
        row["chosen"] = [{"role": "assistant", "content": turn[winner]["response"]}]
        row["rejected"] = [{"role": "assistant", "content": turn[loser]["response"]}]
    row["vote"] = vote
    same_prompt = left["prompt"] == right["prompt"]
    for name, side in (("left", left), ("right", right)):
        row[name] = {k: side[k] for k in ("model", "response", "tokens", "avg_logprob") if k in side}
        if not same_prompt:
            row[name]["prompt"] = list(side["prompt"])
    row["settings"] = dict(turn["settings"])
    row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


class VoteLog:
    """Append-only JSONL file: each row is written, flushed and fsync'd before append() returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()  # two browser tabs voting at once still write whole lines

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as f:
                if f.tell() > 0:  # a line cut short by an earlier crash must not swallow this one
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())

    def count(self) -> dict[str, int]:
        """How many votes of each kind the file holds (unparseable lines are ignored here)."""
        counts = dict.fromkeys(VOTES, 0)
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    vote = json.loads(line).get("vote")
                except (json.JSONDecodeError, AttributeError):
                    continue
                if vote in counts:
                    counts[vote] += 1
        return counts


def default_votes_path(adapter: str) -> Path:
    """Where votes go unless --votes says: beside a local adapter folder (the quickstart's: adapters/quickstart/), else here."""
    local = Path(adapter)
    return (local.parent if local.is_dir() else Path(".")) / VOTES_FILE
