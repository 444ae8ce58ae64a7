"""DeepPlanning: every task file loads, and every hard-constraint type of the data has a tested checker."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepplanning_fixtures import DATA, load_tasks  # noqa: E402

from agent.deepplanning.constraints import CHECKERS, check_hard  # noqa: E402
from agent.deepplanning.env import TravelEnv  # noqa: E402

HAVE_DATA = (DATA / "travelplanning_query_en.json").is_file() and (DATA / "travelplanning_query_zh.json").is_file()
if not HAVE_DATA:
    print(f"DeepPlanning task files not found under {DATA}: data-driven tests are skipped")
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=f"DeepPlanning task files not found under {DATA}")


def type_counts() -> Counter:
    """Constraint type -> occurrences over the en and zh task files."""
    counts: Counter = Counter()
    for language in ("en", "zh"):
        for task in load_tasks(language):
            counts.update(task["meta_info"]["hard_constraints"].keys())
    return counts


def first_instance(kind: str) -> tuple[dict, dict]:
    """(constraint data, meta_info) of the first en task carrying constraint `kind`."""
    for language in ("en", "zh"):
        for task in load_tasks(language):
            if kind in task["meta_info"]["hard_constraints"]:
                return task["meta_info"]["hard_constraints"][kind], task["meta_info"]
    raise KeyError(kind)


@needs_data
@pytest.mark.parametrize("language", ["en", "zh"])
def test_every_task_loads_without_databases(language, tmp_path):
    env = TravelEnv(task_file=str(DATA / f"travelplanning_query_{language}.json"),
                    database_root=str(tmp_path / "absent"), language=language)
    tasks = env.tasks()
    assert len(tasks) == 120 and len({t.id for t in tasks}) == 120
    for task in tasks:
        system, user = task.messages
        assert system["role"] == "system" and "<plan>" in system["content"]
        assert user == {"role": "user", "content": task.data["query"]}
        assert task.data["meta_info"]["hard_constraints"]
    assert len(env.tools(tasks[0])) == 9
    assert env.check() and "Qwen/DeepPlanning" in env.check()[0]


@needs_data
def test_every_constraint_type_in_the_data_has_a_checker():
    missing = sorted(set(type_counts()) - set(CHECKERS))
    assert not missing, f"constraint types without a checker: {missing}"


# -- one passing and one failing hand-made plan per type ------------------------------------

def _ride(mode: str, number: str) -> dict:
    return {"time_slot": "08:00-09:00", "type": "travel_intercity_public",
            "details": {"mode": mode, "number": number, "from": "A", "to": "B", "cost": 10}}


def plan_for(kind: str, data: dict, meta: dict, satisfy: bool) -> dict:
    """A minimal plan holding the constraint's entities (satisfy=True) or other ones (False)."""
    acts: list[dict] = []
    accommodation = {"name": data.get("hotel_name", "X Hotel") if satisfy else "Some Other Hotel", "price_per_night": 100}
    family = kind.split("_")[0]
    if family in ("flight", "train"):
        mode = "flight" if family == "flight" else "train"
        for direction in ("outbound", "inbound"):
            number = data.get(f"{direction}_{family}_no")
            if number:
                acts.append(_ride(mode, number if satisfy else number + "X"))
    elif family == "restaurant":
        name = data["restaurant_name"] if satisfy else "Elsewhere Diner"
        acts.append({"time_slot": "12:00-13:00", "type": "meal", "details": {"name": name, "cost": 1}})
    elif family == "attraction":
        names = data["attraction_names"] if satisfy else data["attraction_names"][:-1]
        acts += [{"time_slot": "14:00-15:00", "type": "attraction", "details": {"name": n, "cost": 0}} for n in names]
    elif kind == "budget_constraint":
        people = int(meta.get("people_number", 1))
        per_person = data["max_budget"] / people
        acts.append({"time_slot": "12:00-13:00", "type": "meal",
                     "details": {"name": "Dinner", "cost": per_person * (0.5 if satisfy else 2)}})
        accommodation = None
    days = [{"day_number": 1, "current_city": "X", "activities": acts},
            {"day_number": 2, "current_city": "X", "activities": []}]
    if accommodation:
        days[0]["accommodation"] = accommodation
    return {"daily_plans": days}


ALL_TYPES = sorted(type_counts()) if HAVE_DATA else []


@needs_data
@pytest.mark.parametrize("kind", ALL_TYPES)
def test_checker_passes_and_fails(kind):
    data, meta = first_instance(kind)
    task_meta = {**meta, "hard_constraints": {kind: data}}
    ok, reason = check_hard(plan_for(kind, data, meta, True), task_meta)[kind]
    assert ok and reason is None
    ok, reason = check_hard(plan_for(kind, data, meta, False), task_meta)[kind]
    assert not ok and reason


@needs_data
def test_a_real_task_with_its_entities_passes_all_constraints():
    meta = load_tasks("en")[0]["meta_info"]
    day = {"current_city": "X", "activities": []}
    for kind, data in meta["hard_constraints"].items():
        first_day = plan_for(kind, data, meta, True)["daily_plans"][0]
        day["activities"] += first_day["activities"] if kind != "budget_constraint" else []
        if kind.startswith("hotel_"):
            day["accommodation"] = first_day["accommodation"]
    results = check_hard({"daily_plans": [day, {"activities": []}]}, meta)
    assert set(results) == set(meta["hard_constraints"]) and all(ok for ok, _ in results.values())


def test_unknown_type_is_left_out_and_checker_errors_fail():
    meta = {"hard_constraints": {"spaceship_named": {"x": 1}, "budget_constraint": {"max_budget": "abc"}}}
    results = check_hard({"daily_plans": [{"activities": []}]}, meta)
    assert "spaceship_named" not in results
    assert results["budget_constraint"][0] is False


def coverage_table() -> str:
    """The markdown table of docs/deepplanning.md: type, count in en+zh tasks, checker tested."""
    counts = type_counts()
    lines = ["| constraint type | tasks (en+zh) | checker | tested pass/fail |", "|---|---|---|---|"]
    for kind in sorted(counts, key=lambda k: (-counts[k], k)):
        checker = CHECKERS.get(kind)
        name = getattr(checker, "__name__", "-") if checker else "MISSING"
        lines.append(f"| {kind} | {counts[kind]} | {name} | {'yes' if checker else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(coverage_table())
