#!/usr/bin/env bash
# The CUDA checks in one command, for a machine with an NVIDIA GPU: the gpu-marked tests, the block
# mask build, and the CUDA benchmark at Llama-3-8B shapes (SDPA, then FlexAttention), with logs and
# results.jsonl rows written to $OUT (default /tmp/qsimpo-gpu-out). Record what it measured in
# benchmarks/RESULTS.md.
#
#     pip install -e '.[bench]' && bash benchmarks/cuda_suite.sh
#
# On a machine without network access, put the wheels it lacks (bitsandbytes, datasets, trl and
# their needs) in .whl/ first: they are installed from there. STEPS / ROUNDS override the
# benchmark's length (defaults 5 / 1, about ten minutes in all).
set -uo pipefail
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
OUT=${OUT:-/tmp/qsimpo-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes, trl; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, trl.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log"
python3 benchmarks/bench_block_mask.py --device cuda 2>&1 | tee "$OUT/block-mask.log"
for attn in sdpa flex_attention; do
  python3 benchmarks/bench_simpo.py --device cuda --steps "${STEPS:-5}" --rounds "${ROUNDS:-1}" --attn "$attn" \
    --work /tmp/qsimpo-bench 2>&1 | tee "$OUT/bench-$attn.log"
done
cp benchmarks/results.jsonl "$OUT/results.jsonl"
