#!/usr/bin/env bash
# Ready for a GPU: run as is on a machine with one CUDA GPU (no network; random models built in
# place; under 8 minutes). Prints one table: bit-exactness of the zero/uniform/mean hooks against
# the weight edit in bfloat16 and float16 on the test suite's tiny architectures, and the sweep
# modes (naive/full/select/screen) on the realistic-shape random VLM (576 image tokens) with their
# ratio to the naive sweep and peak CUDA memory. Without CUDA (or with --cpu) it runs the small CPU
# smoke version that the test suite runs. Exit status 0 only if every check passed.
#   bash benchmarks/gpu_check.sh [--cpu] [--work DIR]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if [ -x "$HERE/../.venv/bin/python" ] && [ -z "${PYTHON_SET:-}" ]; then PYTHON="$HERE/../.venv/bin/python"; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$HERE/gpu_check.py" "$@"
