#!/usr/bin/env bash
# Table 8: adaptive KL (entropy sampling at 50% plus teacher-entropy loss weights; our reading of
# appendix B.1) vs standard entropy sampling at 50%, Qwen3 pair; all tokens as the reference row and
# teacher-entropy weighting alone (keep every token) as an ablation.
# Usage: scripts/reproduce_table8.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-8b_to_qwen3-4b
METHODS=all,entropy_sample_50,adaptive_kl_50,teacher_entropy
exec python -m scripts.paper.launch --table 8 --pairs "$PAIRS" --methods "$METHODS" "$@"
