#!/usr/bin/env bash
# One prepared GPU check for pallas_kernels.block_sparse (Triton kernels); < 8 min on an H200.
# Usage: bash benchmarks/gpu_check.sh   (results also written to $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave room for torch's flex_attention
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
timeout 460 "$PY" benchmarks/gpu_check.py "$@"
