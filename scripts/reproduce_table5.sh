#!/usr/bin/env bash
# Table 5: all tokens vs entropy top-k 50%/20% vs Soft-OR top-k 50%/20%.
# Usage: scripts/reproduce_table5.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-8b_to_qwen3-4b,llama3.3-70b_to_llama3.1-8b,qwen2.5-14b_to_qwen2.5-1.5b
METHODS=all,entropy_topk_50,entropy_topk_20,soft_or_50,soft_or_20
exec python -m scripts.paper.launch --table 5 --pairs "$PAIRS" --methods "$METHODS" "$@"
