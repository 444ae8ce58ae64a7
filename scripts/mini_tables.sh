#!/usr/bin/env bash
# The paper's tables 3-6 and 8 in miniature on the demo task: every method x 3 seeds, then the tables.
# Usage: scripts/mini_tables.sh [--quick] [--seeds 0,1,2] [--steps 100] [--out DIR] [--only M1,M2] [--threads N] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m scripts.mini_tables "$@"
