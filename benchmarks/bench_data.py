"""The data path at the paper's scale: a 60,000-pair HH-style file, read, rendered and tokenized.

    python benchmarks/bench_data.py --tokenizer MODEL_DIR [--gguf-file NAME] [--pairs 60000] [--work DIR]

Builds the file from ../shared/data/hh-rlhf-harmless/sample.jsonl (each pair repeated with a
numbered first turn, so no two pairs are equal), then runs `qsimpo.data.build_dataset` twice, each
in a fresh process as `qsimpo train` would: the first run and a rerun on the same file and
settings. Prints the wall time and the peak RSS each run added on top of the loaded tokenizer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless" / "sample.jsonl"

CHILD = r"""
import json, resource, sys, time
from transformers import AutoTokenizer
from qsimpo.config import DataConfig
from qsimpo.data import build_dataset
path, tokenizer, gguf = sys.argv[1], sys.argv[2], sys.argv[3] or None
tok = AutoTokenizer.from_pretrained(tokenizer, gguf_file=gguf)
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
base = int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30
t0 = time.perf_counter()
pairs, summary = build_dataset(DataConfig(path=path, format="implicit", max_length=512, max_prompt_length=384,
                                          on_bad_row="skip"), tok)
n = sum(1 for _ in pairs)
print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": round(rss(), 3),
                  "rss_before_gib": round(base, 3), "kept": summary.kept, "rows_read": summary.rows_read, "iterated": n}))
"""


def make_file(out: Path, n_pairs: int) -> Path:
    rows = [json.loads(line) for line in HH.read_text().splitlines() if line.strip()]
    with out.open("w") as f:
        for i in range(n_pairs):
            row = rows[i % len(rows)]
            tag = f" ({i})"
            f.write(json.dumps({k: row[k].replace("\n\nHuman: ", f"\n\nHuman:{tag} ", 1) for k in ("chosen", "rejected")}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="model folder (or Hub id) whose tokenizer and chat template to use")
    ap.add_argument("--gguf-file", default="", help="GGUF file name inside --tokenizer, if the model is a GGUF")
    ap.add_argument("--pairs", type=int, default=60000)
    ap.add_argument("--work", default="/tmp/qsimpo-bench-data")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"hh-{args.pairs}.jsonl"
    if not path.exists():
        make_file(path, args.pairs)
    print(f"{path}: {args.pairs} pairs, {path.stat().st_size / 2**20:.0f} MiB")
    for label in ("first run", "rerun"):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.tokenizer, args.gguf_file],
                             capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{label}: {result} (process {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
