#!/usr/bin/env bash
# Ready for a GPU: run as is on a machine with one CUDA GPU (no network; random models built in
# place; under 8 minutes: optional rows past a 420 s budget are skipped, and say so). Prints one
# table (benchmarks/gpu_check.py's docstring says exactly what): bit-exactness of the
# zero/uniform/mean hooks against the weight edit in bfloat16 and float16 on the test suite's tiny
# architectures; the sweep modes (naive/full/select/screen) on the realistic-shape random VLM (576
# image tokens) with their ratio to the naive sweep and peak CUDA memory; the batched sweep engine
# against the sequential one (sweep_batch=false) in bfloat16 (wall ratio, peak CUDA memory of each,
# identical (variant, doc) scores and decision) on the realistic VLM, on a random LLaVA-NeXT of real
# 7B width (hidden 4096, 32 heads, 8 layers, 2928 image tokens) and on tiny architectures. Without
# CUDA (or with --cpu) it runs the small CPU smoke version that the test suite runs (the 7B-width
# model only built shrunk). Exit status 0 only if every check passed (the engine agreement
# figures are measurements, not checks).
#   bash benchmarks/gpu_check.sh [--cpu] [--work DIR]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if [ -x "$HERE/../.venv/bin/python" ] && [ -z "${PYTHON_SET:-}" ]; then PYTHON="$HERE/../.venv/bin/python"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
