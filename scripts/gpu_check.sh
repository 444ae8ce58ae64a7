#!/usr/bin/env bash
# The GPU checks in one command (<= 10 minutes, one table at the end); see scripts/gpu_check.py.
#   scripts/gpu_check.sh            # on a machine with one CUDA GPU
#   scripts/gpu_check.sh --dry-run  # anywhere: the plan
# Without a GPU it says so in one line and exits non-zero.
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
