#!/usr/bin/env bash
# Table 8: adaptive KL (teacher-entropy loss weights) vs standard entropy sampling, Qwen3 pair.
# Usage: scripts/reproduce_table8.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-8b_to_qwen3-4b
METHODS=all,entropy_sample_50,teacher_entropy
exec python -m scripts.paper.launch --table 8 --pairs "$PAIRS" --methods "$METHODS" "$@"
