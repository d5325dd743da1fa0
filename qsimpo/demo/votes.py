"""Demo votes → preference rows that `qsimpo train` reads, appended to a JSONL file one fsync'd line at a time.

A "left better" / "right better" vote is a conversational (TRL-style) preference row:

    {"prompt": [{"role": "system"|"user"|"assistant", "content": ...}, ..., {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": <preferred answer>}],
     "rejected": [{"role": "assistant", "content": <other answer>}],
     "vote": "left" | "right",
     "left": {"model", "name", "loss", "column", "response", "tokens", "avg_logprob": {column: ...}}, "right": {...},
     "settings": {"temperature", "top_p", "max_new_tokens", "seed", "system_prompt"}, "time": ISO-8601}

A "tie" or "both bad" vote is the same row without chosen/rejected: it is kept (it is data about
the two models) but carries no preference, so qsimpo.formats counts it as dropped
(``no_preference``) instead of training on it or stopping on it.

In a multi-turn chat each side answered its own history, so the two prompts differ after the
first turn; the row's prompt is then the preferred side's history (the conversation the user
endorsed), and each side's own history is kept under left/right "prompt".

"left" and "right" are the two columns the vote compared: with one adapter the demo's two columns,
with several (``qsimpo demo --adapter A --adapter B``) the two the user picked. Each names its
column ("column": the demo's key, "name": the adapter's or "SFT", "loss": the loss it was trained
with, e.g. "dpo β 0.1"); rows written before those keys existed lack them and read the same.

With ``--votes-repo OWNER/NAME`` (a Space's QSIMPO_VOTES_REPO) the file is also committed to that Hub
dataset repo by huggingface_hub's CommitScheduler (``hub_votes``): each process writes its own
``votes-<id>.jsonl`` under the repo's data/, so a restarted Space adds a file and loses nothing;
`qsimpo train CONFIG --data.path OWNER/NAME` reads them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from qsimpo.data.formats import NO_PREFERENCE_VOTES
from qsimpo.errors import QsimpoError, UsageError

VOTES_FILE = "votes.jsonl"  # the default votes file's name (beside the adapter folder)
VOTES = {"left": "left better", "right": "right better", "tie": "tie", "both_bad": "both bad"}
SIDE_KEYS = ("model", "name", "loss", "column", "response", "tokens", "avg_logprob")  # what a row keeps of each side
HUB_FOLDER = "data"  # where the votes files go in a --votes-repo dataset (the folder load_dataset reads)
COMMIT_MINUTES = 2.0  # how often new votes are committed to --votes-repo (and once more when the demo exits)


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
        row[name] = {k: side[k] for k in SIDE_KEYS if k in side}
        if not same_prompt:
            row[name]["prompt"] = list(side["prompt"])
    row["settings"] = dict(turn["settings"])
    row["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return row


class VoteLog:
    """Append-only JSONL file: each row is written, flushed and fsync'd before append() returns."""

    def __init__(self, path: str | Path, commit_lock: threading.Lock | None = None, repo_id: str | None = None):
        self.path = Path(path)
        self._lock = threading.Lock()  # two browser tabs voting at once still write whole lines
        # held while appending, so a scheduled commit (hub_votes) never uploads half a line
        self.commit_lock, self.repo_id, self.scheduler = commit_lock, repo_id, None

    def append(self, row: dict) -> None:
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock, (self.commit_lock or contextlib.nullcontext()):
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


def hub_votes(repo_id: str, folder: str | Path, every: float = COMMIT_MINUTES, api=None) -> VoteLog:
    """A VoteLog whose file (``folder``/votes-<id>.jsonl, this process's own) huggingface_hub's CommitScheduler
    commits to ``HUB_FOLDER``/ of the Hub dataset ``repo_id`` every ``every`` minutes and when the process exits.
    ``api``: the HfApi to commit with (default: one with the token of HF_TOKEN or `hf auth login`)."""
    from huggingface_hub import CommitScheduler

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise UsageError(f"--votes-repo {repo_id!r} must be a Hub dataset id, OWNER/NAME (e.g. your-name/demo-votes)")
    if api is None:
        from huggingface_hub import HfApi

        from qsimpo.export.hub import find_token

        api = HfApi(token=find_token())  # one message for a missing or malformed token, before the scheduler starts
    name = f"votes-{uuid.uuid4().hex[:12]}.jsonl"  # this process's own file: a restart must not overwrite the last one's
    try:
        scheduler = CommitScheduler(repo_id=repo_id, repo_type="dataset", folder_path=folder, path_in_repo=HUB_FOLDER,
                                    allow_patterns=[name], every=every, hf_api=api)
    except Exception as e:  # creating the repo failed: no write access, no network
        raise QsimpoError(f"--votes-repo {repo_id}: the dataset repo could not be created or reached ({type(e).__name__}: "
                          f"{e}); check the name, the network and that the token can write to {repo_id.split('/')[0]}") from None
    log = VoteLog(Path(scheduler.folder_path) / name, commit_lock=scheduler.lock, repo_id=scheduler.repo_id)
    log.scheduler = scheduler
    return log
