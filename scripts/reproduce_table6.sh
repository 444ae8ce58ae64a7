#!/usr/bin/env bash
# Table 6: Soft-OR top 50% vs bottom 50%.
# Usage: scripts/reproduce_table6.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-8b_to_qwen3-4b,llama3.3-70b_to_llama3.1-8b,qwen2.5-14b_to_qwen2.5-1.5b
METHODS=soft_or_50,soft_or_bottom_50
exec python -m scripts.paper.launch --table 6 --pairs "$PAIRS" --methods "$METHODS" "$@"
