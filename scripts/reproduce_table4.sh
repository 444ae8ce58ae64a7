#!/usr/bin/env bash
# Table 4: training on Q3 (overconfident) tokens only, 10% retention, vs all tokens.
# Usage: scripts/reproduce_table4.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-8b_to_qwen3-4b,llama3.3-70b_to_llama3.1-8b,qwen2.5-14b_to_qwen2.5-1.5b
METHODS=all,q3_only_10
exec python -m scripts.paper.launch --table 4 --pairs "$PAIRS" --methods "$METHODS" "$@"
