#!/usr/bin/env bash
# GPU benchmark in one bounded run (<= 9 minutes): compiled model images/s vs batch size, the
# service end to end on CUDA, then `make bench`'s side by side (floor, FastAPI + ONNX Runtime peer,
# the service: on CUDA its default placement batches in the inference workers through
# torch.compile). Needs a CUDA machine; prints why not otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 "$PY" -m loadtest.gpu_bench
exec timeout 240 "$PY" -m loadtest.bench --seconds 5 --repeat 1 --v2-seconds 4
