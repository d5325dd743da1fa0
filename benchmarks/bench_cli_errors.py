"""How long a user waits for the message when an argument is wrong: wall time of `python -m qsimpo ...`, start to exit.

    python benchmarks/bench_cli_errors.py [--repeat 3] [--baseline /path/to/another/checkout]

Each case runs as a user types it, in a fresh process, from a scratch folder holding an `adapters/`
folder (as after `qsimpo quickstart`), with the Hub unreachable as it is offline (HF_HUB_OFFLINE
unset: the commands must not try the Hub for a name that can only be a local path). Prints, per case,
the median wall time over --repeat runs, the exit code and the message's first line; with
--baseline, the same cases run on that checkout's qsimpo (PYTHONPATH) once each for comparison.
One JSON row per run of the script is appended to benchmarks/results_cli_errors.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "eval adapters/nope": ["eval", "adapters/nope"],
    "train quickstart.yaml --data.path nope.jsonl": ["train", str(ROOT / "configs" / "quickstart.yaml"),
                                                     "--data.path", "nope.jsonl"],
    "demo --adapter adapters/nope": ["demo", "--adapter", "adapters/nope"],
    "merge nope --out x": ["merge", "nope", "--out", "x"],
    "eval ADAPTER --out FILE": ["eval", "adapters/run", "--out", "file.txt"],
    "train quickstart.yaml --train.output_dir FILE": ["train", str(ROOT / "configs" / "quickstart.yaml"), "--data.path",
                                                      "pairs.jsonl", "--train.output_dir", "file.txt"],
    "merge ADAPTER --out x --dtype float8": ["merge", "adapters/run", "--out", "x", "--dtype", "float8"],
}


def scratch() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="qsimpo-cli-errors-"))
    (folder / "adapters" / "run").mkdir(parents=True)
    (folder / "adapters" / "run" / "adapter_config.json").write_text("{}")
    (folder / "file.txt").write_text("a file the user had\n")
    (folder / "pairs.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    return folder


def once(tree: Path, argv: list[str], cwd: Path) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "qsimpo", *argv], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)
    seconds = time.perf_counter() - t0
    message = next((line for line in done.stderr.splitlines() if line.startswith("error:")), done.stderr[-200:])
    return seconds, done.returncode, message


def versions() -> dict:
    from importlib.metadata import version

    return {"python": platform.python_version(), **{p: version(p) for p in ("torch", "transformers", "peft")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout's root, run once per case for comparison")
    args = ap.parse_args()
    cwd = scratch()
    rows = []
    for name, argv in CASES.items():
        runs = [once(ROOT, argv, cwd) for _ in range(args.repeat)]
        row = {"case": name, "seconds": round(statistics.median(r[0] for r in runs), 2),
               "runs": [round(r[0], 2) for r in runs], "exit": runs[0][1], "message": runs[0][2][:300]}
        if args.baseline:
            s, code, message = once(args.baseline, argv, cwd)
            row["baseline"] = {"seconds": round(s, 2), "exit": code, "message": message[:300]}
        rows.append(row)
        base = f"  (baseline {row['baseline']['seconds']:.1f} s, exit {row['baseline']['exit']})" if args.baseline else ""
        print(f"{row['seconds']:6.2f} s  exit {row['exit']}  {name}{base}\n          {row['message'][:160]}", flush=True)
    unchanged = (cwd / "file.txt").read_text() == "a file the user had\n"
    print(f"the user's file.txt unchanged: {unchanged}")
    record = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": os.getloadavg(), "versions": versions(), "repeat": args.repeat, "cases": rows,
              "file_unchanged": unchanged}
    with open(ROOT / "benchmarks" / "results_cli_errors.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
