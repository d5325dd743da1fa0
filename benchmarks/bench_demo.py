"""Latency of one demo exchange (both columns answered and scored), through the real server.

    qsimpo quickstart                                   # once: adapters/quickstart/
    python benchmarks/bench_demo.py                     # its adapter; --adapter DIR [--base DIR] for another

Starts `python -m qsimpo demo` as its own process on a free port (so it measures whichever qsimpo
that interpreter imports: put a checkout first on PYTHONPATH to measure that one), then with
gradio_client:

- one user: the wall time of `/send` (one message, both answers streamed to the end, then their
  average log-probs under both sides) at temperature 0 and a fixed max_new_tokens, the median
  over --rounds after one warm-up exchange; the history is cleared before each, so every exchange
  is the same;
- --users at once: that many clients send different messages at the same moment; the wall time
  until the last answer is complete, and the median of the users' own latencies (median of rounds).

Prints one JSON row and appends it to benchmarks/results_demo.jsonl; RESULTS.md is written by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPTS = ["Tell me about owls.", "How do bees make honey?", "Describe the moon.", "What do foxes eat?",
           "Why do cats purr?", "Tell me about rivers.", "How do birds fly?", "Describe a forest."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the demo exited with {server.returncode} before serving")
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"the demo did not answer at {url} within {timeout:.0f} s")


def exchange(client, prompt: str, max_new: int) -> tuple[float, list[int]]:
    """(seconds, |y| of each side) for one /send at temperature 0, on a cleared history."""
    client.predict(api_name="/clear")
    start = time.perf_counter()
    _, left, right, left_stats, right_stats, _ = client.predict(prompt, "", 0, 1.0, max_new, 0, api_name="/send")
    seconds = time.perf_counter() - start
    return seconds, [int(re.search(r"\*\*(\d+) tokens", s).group(1)) for s in (left_stats, right_stats)]


def qsimpo_source(env: dict) -> dict:
    code = "import qsimpo, pathlib; print(pathlib.Path(qsimpo.__file__).resolve().parents[1])"
    root = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"path": root, "commit": commit or None}


def versions() -> dict:
    import bitsandbytes
    import gradio
    import peft
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, transformers, peft, bitsandbytes, gradio)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default="adapters/quickstart/adapter")
    p.add_argument("--base", help="default: the quickstart's base beside --adapter, else the adapter's own record")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--label", default="", help="a name for this row (e.g. the change measured)")
    args = p.parse_args()
    from gradio_client import Client

    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SystemExit(f"no adapter at {adapter}: run `qsimpo quickstart` first, or pass --adapter DIR")
    base = args.base or (str(adapter.parent / "base") if (adapter.parent / "base").is_dir() else None)
    port, env = free_port(), dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "qsimpo", "demo", "--adapter", str(adapter.resolve()), "--port", str(port),
               "--votes", str(Path(tmp) / "votes.jsonl"), *(["--base", str(Path(base).resolve())] if base else [])]
        server = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(url, server)
            clients = [Client(url, verbose=False, analytics_enabled=False, download_files=False) for _ in range(args.users)]
            exchange(clients[0], PROMPTS[0], args.max_new_tokens)  # warm-up
            single = [exchange(clients[0], PROMPTS[0], args.max_new_tokens) for _ in range(args.rounds)]
            together, walls = [], []
            for _ in range(args.rounds):
                got = [None] * args.users

                def one(i):
                    got[i] = exchange(clients[i], PROMPTS[i % len(PROMPTS)], args.max_new_tokens)

                start = time.perf_counter()
                threads = [threading.Thread(target=one, args=(i,)) for i in range(args.users)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                walls.append(time.perf_counter() - start)
                together.append(statistics.median(g[0] for g in got))
        finally:
            server.terminate()
            server.wait(timeout=60)
    row = {"bench": "demo", "label": args.label, "date": date.today().isoformat(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "versions": versions(), "qsimpo": qsimpo_source(env), "adapter": str(adapter),
           "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "tokens": single[0][1],
           "one_user_s": round(statistics.median(s for s, _ in single), 3),
           "one_user_rounds_s": [round(s, 3) for s, _ in single],
           "users": args.users, "users_wall_s": round(statistics.median(walls), 3),
           "users_median_latency_s": round(statistics.median(together), 3),
           "users_wall_rounds_s": [round(w, 3) for w in walls]}
    print(json.dumps(row))
    with (HERE / "results_demo.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
