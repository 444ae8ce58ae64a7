"""Scoring a final answer offline: parse the `<plan>` JSON, check hard constraints and commonsense.

Score.value is the fraction of the task's hard constraints the plan satisfies (the paper's metric).
parts:
    hard_constraint_rate  the same fraction
    hard_all_pass         1.0 when every hard constraint holds (the official "personalized" score)
    commonsense           mean of the judged commonsense dimensions (see commonsense.py)
    composite             (commonsense + hard_all_pass) / 2, as the official evaluation combines them
    case_acc              1.0 when commonsense and hard_all_pass are both 1.0
    parse_failed          1.0 when no plan object could be read (every other part is then 0)
    commonsense_dims      how many of the 8 dimensions were judged
"""

from __future__ import annotations

from agent.deepplanning import commonsense
from agent.deepplanning.constraints import check_hard
from agent.deepplanning.database import TaskDatabase
from agent.deepplanning.plan import extract_plan
from agent.env import Score


def score_plan(task_record: dict, plan_text: str, database: TaskDatabase | None = None) -> Score:
    """The score of `plan_text` (an answer holding `<plan>{...}</plan>`) on one task record.

    `database` is the task's own database; without it the commonsense checks that need it are
    skipped. Never raises on a malformed answer.
    """
    meta = task_record.get("meta_info") if isinstance(task_record, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    plan = extract_plan(plan_text)
    if plan is None:
        return Score(0.0, {"hard_constraint_rate": 0.0, "hard_all_pass": 0.0, "commonsense": 0.0,
                           "composite": 0.0, "case_acc": 0.0, "parse_failed": 1.0, "commonsense_dims": 0.0})
    return score_parsed(plan, meta, database)


def score_parsed(plan: dict, meta: dict, database: TaskDatabase | None = None) -> Score:
    """The score of an already parsed plan object (see score_plan)."""
    hard = check_hard(plan, meta)
    rate = sum(ok for ok, _ in hard.values()) / len(hard) if hard else 0.0
    all_pass = 1.0 if hard and all(ok for ok, _ in hard.values()) else 0.0
    common, dims = commonsense.score(commonsense.evaluate(plan, meta, database))
    return Score(rate, {
        "hard_constraint_rate": rate, "hard_all_pass": all_pass, "commonsense": common,
        "composite": (common + all_pass) / 2, "case_acc": 1.0 if common == 1.0 and all_pass == 1.0 else 0.0,
        "parse_failed": 0.0, "commonsense_dims": float(len(dims)),
    })


def hard_results(task_record: dict, plan_text: str) -> dict[str, tuple[bool, str | None]]:
    """Per-constraint (passed, reason) of an answer, for inspection ({} when it does not parse)."""
    plan = extract_plan(plan_text)
    meta = task_record.get("meta_info", {}) if isinstance(task_record, dict) else {}
    return check_hard(plan, meta) if plan is not None else {}
