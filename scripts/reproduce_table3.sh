#!/usr/bin/env bash
# Table 3: entropy sampling (p ∝ h) at retention 100/50/30/20/10%, three math pairs, with peak memory.
# Usage: scripts/reproduce_table3.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-8b_to_qwen3-4b,llama3.3-70b_to_llama3.1-8b,qwen2.5-14b_to_qwen2.5-1.5b
METHODS=all,entropy_sample_50,entropy_sample_30,entropy_sample_20,entropy_sample_10
exec python -m scripts.paper.launch --table 3 --pairs "$PAIRS" --methods "$METHODS" "$@"
