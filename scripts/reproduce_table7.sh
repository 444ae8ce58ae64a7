#!/usr/bin/env bash
# Table 7: DeepPlanning agentic planning, teachers Qwen3-14B and Qwen3-32B -> Qwen3-1.7B (Avg@16, Best@16).
# Usage: scripts/reproduce_table7.sh [--dry-run] [--pair NAME] [--student PATH] [--teacher PATH] [key=value ...]
# The DeepPlanning files are keys: agent.env_args.task_file=PATH agent.env_args.database_root=PATH (docs/reproducing.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=qwen3-14b_to_qwen3-1.7b,qwen3-32b_to_qwen3-1.7b
METHODS=all,entropy_topk_50,entropy_topk_20,q3_only_20,soft_or_50,soft_or_20
exec python -m scripts.paper.launch --table 7 --pairs "$PAIRS" --methods "$METHODS" "$@"
