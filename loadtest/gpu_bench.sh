#!/usr/bin/env bash
# GPU benchmark in one bounded run (<= 8 minutes): compiled model images/s vs batch size,
# then the service end to end on CUDA. Needs a CUDA machine; prints why not otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PY" -m loadtest.gpu_bench
