"""What each paper table shows, and the figures the paper publishes in its text.

Which pairs and methods a table runs is written in its script
(`scripts/reproduce_tableN.sh`); this module only knows how a table is laid
out and what the paper says its cells should be. Most of the paper's tables
survive only as prose: the published figures below are all that SPEC.md
section 5 ("Published figures that survive in the text") records.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MATH_BENCHMARKS = ("math500", "aime24", "aime25")
# Agentic runs evaluate their held-out DeepPlanning tasks in training as the benchmark `heldout`
# (opd/agentic.py); its summary holds avg@k, best@k and std@k (percent).
AGENTIC_BENCHMARKS = ("heldout",)

QWEN3 = "qwen3-8b_to_qwen3-4b"
LLAMA = "llama3.3-70b_to_llama3.1-8b"
QWEN25 = "qwen2.5-14b_to_qwen2.5-1.5b"
AGENT14 = "qwen3-14b_to_qwen3-1.7b"
AGENT32 = "qwen3-32b_to_qwen3-1.7b"

# Fallback row labels; a row whose run has a config.yaml is labelled from its resolved model paths
# (scripts/paper/aggregate.py pair_label), so a Qwen3 row says which teacher it really used.
PAIR_LABELS = {
    QWEN3: "Qwen3-8B → Qwen3-4B",
    LLAMA: "Llama-3.3-70B → Llama-3.1-8B",
    QWEN25: "Qwen2.5-14B → Qwen2.5-1.5B",
    AGENT14: "Qwen3-14B → Qwen3-1.7B (agentic)",
    AGENT32: "Qwen3-32B → Qwen3-1.7B (agentic)",
}

BENCHMARK_LABELS = {"math500": "MATH-500", "aime24": "AIME24", "aime25": "AIME25", "heldout": "DeepPlanning held-out"}

# Rows are listed in this order (methods not named here follow, sorted).
METHOD_ORDER = (
    "all", "entropy_sample_50", "entropy_sample_30", "entropy_sample_20", "entropy_sample_10",
    "entropy_topk_50", "entropy_topk_20", "q3_only_20", "q3_only_10", "soft_or_50", "soft_or_20",
    "soft_or_bottom_50", "adaptive_kl_50", "teacher_entropy",
)

# The paper reports "mean@16 ± std" without defining the std.
STD_NOTE = ("The paper reports mean@16 ± std without saying what the std is taken over; ours is the population std "
            "of the 16 sample-set accuracies (sample j of every problem; eval/metrics.py std_at_k).")


@dataclass(frozen=True)
class TableSpec:
    """How one table is laid out.

    metrics: which columns each benchmark gets: "mean" (mean@k ± std@k), "pass" (pass@k),
    "avg" (Avg@k ± std@k of fractional scores) and/or "best" (Best@k), as the summary names them.
    memory: add peak GPU memory per run and its change against the same pair's
    all-token run. kept_tokens: add the kept-token count per step and share.
    """

    title: str
    benchmarks: tuple[str, ...] = MATH_BENCHMARKS
    metrics: tuple[str, ...] = ("mean",)
    metric_labels: dict = field(default_factory=lambda: {"mean": "mean@k ± std", "pass": "pass@k"})
    memory: bool = False
    kept_tokens: bool = False
    notes: tuple[str, ...] = ()


TABLES: dict[int, TableSpec] = {
    3: TableSpec(
        "Table 3: entropy sampling (p ∝ h) at several retention ratios; accuracy %, mean@16 ± std; peak memory",
        memory=True,
        notes=("Paper: peak memory down by up to 47% at 50% retention and up to 58% under more aggressive "
               "retention (which pair and ratio the 58% belongs to is not given).",),
    ),
    4: TableSpec(
        "Table 4: training on Q3 (overconfident) tokens only vs all tokens; accuracy %, mean@16 ± std",
        kept_tokens=True,
        notes=("Paper: Qwen3 Q3-only reaches 76.1 on MATH-500 with 5.7K tokens (<10% of all tokens); the paper "
               "does not say per what (step, mini-batch) the 5.7K is counted. Ours: mean tip/num_kept per step.",),
    ),
    5: TableSpec("Table 5: all tokens vs entropy top-k vs Soft-OR top-k; accuracy %, mean@16 ± std"),
    6: TableSpec("Table 6: Soft-OR top 50% vs bottom 50%; accuracy %, mean@16 ± std"),
    7: TableSpec(
        "Table 7: DeepPlanning travel, Qwen3-1.7B student, thinking on; held-out tasks, Avg@16 ± std and Best@16 (%)",
        benchmarks=AGENTIC_BENCHMARKS,
        metrics=("avg", "best"),
        metric_labels={"avg": "Avg@16 ± std", "best": "Best@16"},
        notes=("A score is the fraction of a task's hard constraints the final plan satisfies; Avg@16 is its mean over "
               "the 16 samples and the held-out tasks (20% of the travel tasks, <run>/split.json), Best@16 the mean "
               "over tasks of the best of 16. Our std is the population std of the 16 sample-set Avg scores; the "
               "paper does not define its ±.",
               "Ours asks the agent for the plan as JSON in a <plan> block and scores it offline; the official "
               "evaluation converts a free-text plan with a hosted LLM first (docs/deepplanning.md).",
               "The paper's Best@16 figures come from the text of its appendix B.2 (figure 4), which names only four of them."),
    ),
    8: TableSpec(
        "Table 8: adaptive KL vs standard entropy sampling, Qwen3 pair; accuracy %, mean@16 ± std",
        notes=("adaptive_kl_50 is our reading of appendix B.1 (the paper gives no formula): entropy sampling at 50% "
               "with each kept token's loss weighted by 1 + normalised teacher entropy. teacher_entropy (every token "
               "kept, weighted by teacher entropy alone) is an ablation of ours, not a row of the paper.",
               "The paper does not state the retention ratio of its 'standard sampling' row; we use 50%.",
               "The paper's finding is that adaptive KL gives no consistent improvement over standard sampling; "
               "its table 8 figures are not in the text."),
    ),
}

# (pair, method) -> {(benchmark, metric): published value (%)}. The all-token
# baselines are the same runs in every table that has an all-token row.
_BASELINES = {
    (QWEN3, "all"): {("math500", "mean"): 76.7},
    (LLAMA, "all"): {("math500", "mean"): 71.0},
}
_TABLE7 = {
    (AGENT14, "all"): {("heldout", "avg"): 11.7, ("heldout", "best"): 18.9},
    (AGENT32, "all"): {("heldout", "avg"): 12.8, ("heldout", "best"): 19.7},
    (AGENT14, "entropy_topk_50"): {("heldout", "avg"): 12.1},
    (AGENT32, "entropy_topk_50"): {("heldout", "avg"): 13.1},
    (AGENT14, "entropy_topk_20"): {("heldout", "avg"): 11.6},
    (AGENT32, "entropy_topk_20"): {("heldout", "avg"): 12.7},
    (AGENT14, "q3_only_20"): {("heldout", "avg"): 12.6},
    (AGENT32, "q3_only_20"): {("heldout", "avg"): 13.6, ("heldout", "best"): 20.1},
    (AGENT14, "soft_or_50"): {("heldout", "avg"): 12.0},
    (AGENT32, "soft_or_50"): {("heldout", "avg"): 13.1},
    (AGENT14, "soft_or_20"): {("heldout", "avg"): 12.1, ("heldout", "best"): 20.3},
    (AGENT32, "soft_or_20"): {("heldout", "avg"): 12.6},
}
PUBLISHED: dict[int, dict[tuple[str, str], dict[tuple[str, str], float]]] = {
    3: {**_BASELINES,
        (QWEN3, "entropy_sample_50"): {("math500", "mean"): 78.6},
        (LLAMA, "entropy_sample_50"): {("math500", "mean"): 74.0}},
    4: {**_BASELINES, (QWEN3, "q3_only_10"): {("math500", "mean"): 76.1}},
    5: dict(_BASELINES),
    6: {},
    7: _TABLE7,
    8: dict(_BASELINES),
}
# Table 7's published standard deviations (Avg@16 ± std).
PUBLISHED_STD = {
    (AGENT14, "all"): 0.07, (AGENT32, "all"): 0.07,
    (AGENT14, "entropy_topk_50"): 0.06, (AGENT32, "entropy_topk_50"): 0.07,
    (AGENT14, "entropy_topk_20"): 0.07, (AGENT32, "entropy_topk_20"): 0.06,
    (AGENT14, "q3_only_20"): 0.07, (AGENT32, "q3_only_20"): 0.07,
    (AGENT14, "soft_or_50"): 0.06, (AGENT32, "soft_or_50"): 0.08,
    (AGENT14, "soft_or_20"): 0.06, (AGENT32, "soft_or_20"): 0.07,
}
# (table, pair, method) -> where a published figure shown in that table's cell comes from, when it is
# not that table's own text: the all-token baselines are printed once, in section 7.2 beside table 3,
# and carried into the other tables (section 7.3 repeats Qwen3's 76.7 for table 4).
CARRIED_FROM = {(table, pair, "all"): "section 7.2 (table 3)"
                for table in (4, 5, 8) for pair in (QWEN3, LLAMA) if (table, pair) != (4, QWEN3)}
# (table, pair, method) -> published kept tokens.
PUBLISHED_KEPT = {(4, QWEN3, "q3_only_10"): 5700}


def method_sort_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)
