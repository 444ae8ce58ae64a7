"""DeepPlanning: offline scoring of the <plan> JSON, malformed answers, commonsense checks, check()."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepplanning_fixtures import TASK, answer, build_database, good_plan, write_task_file  # noqa: E402

from agent.deepplanning import commonsense  # noqa: E402
from agent.deepplanning.database import TaskDatabase  # noqa: E402
from agent.deepplanning.env import TravelEnv  # noqa: E402
from agent.deepplanning.plan import extract_plan  # noqa: E402
from agent.deepplanning.scoring import hard_results, score_plan  # noqa: E402
from agent.registry import load_env  # noqa: E402


@pytest.fixture
def db(tmp_path):
    return TaskDatabase(build_database(tmp_path / "database_en") / "id_7")


def test_correct_plan_scores_one_with_and_without_database(db):
    full = score_plan(TASK, answer(good_plan()), db)
    assert full.value == 1.0 and full.parts["composite"] == 1.0 and full.parts["commonsense"] == 1.0
    assert full.parts["commonsense_dims"] == 8 and full.parts["parse_failed"] == 0.0
    bare = score_plan(TASK, answer(good_plan()))
    assert bare.value == 1.0 and bare.parts["commonsense_dims"] == 6  # sandbox and business hours need the database


def test_env_scores_through_registry_and_state(tmp_path):
    root = build_database(tmp_path / "database_en")
    env = load_env("deepplanning_travel", {"task_file": str(write_task_file(tmp_path / "t")), "database_root": str(root)})
    task = env.tasks()[0]
    thinking = "<think>draft <plan>{}</plan></think>\n" + answer(good_plan())
    result = env.score(task, env.start(task), thinking)
    assert result.value == 1.0 and result.parts["commonsense_dims"] == 8


def test_partial_plan_scores_the_fraction(db):
    plan = good_plan()
    plan["daily_plans"][0]["accommodation"]["name"] = "Ji Hotel Xinjiekou"  # hotel constraint fails
    plan["daily_plans"][0]["activities"][11]["details"]["name"] = "Duck House"  # restaurant fails, meals repeat
    result = score_plan(TASK, answer(plan), db)
    assert result.value == pytest.approx(3 / 5) and result.parts["hard_all_pass"] == 0.0
    assert result.parts["composite"] == pytest.approx(result.parts["commonsense"] / 2)
    assert not hard_results(TASK, answer(plan))["hotel_star_service_required"][0]


@pytest.mark.parametrize("text", [
    "no plan at all", "<plan>{not json</plan>", "<plan>[1, 2]</plan>", "<plan>{\"a\": 1}", None, 42,
])
def test_unparsable_answers_score_zero_and_count(text):
    result = score_plan(TASK, text)
    assert result.value == 0.0 and result.parts["parse_failed"] == 1.0 and result.parts["composite"] == 0.0


@pytest.mark.parametrize("plan", [
    {}, {"daily_plans": "soon"}, {"daily_plans": [1, "x", None]}, {"daily_plans": [{"activities": "lots"}]},
    {"daily_plans": [{"current_city": 5, "accommodation": [], "activities": [{"type": "meal", "details": "x"},
                                                                            {"type": None, "time_slot": 9}]}]},
    {"budget_summary": "cheap", "daily_plans": [{"activities": [{"type": "attraction", "time_slot": "25:00-26:00",
                                                                 "details": {"name": ["x"], "cost": {"a": 1}}}]}]},
])
def test_malformed_plans_never_raise(plan, db):
    for database in (db, None):
        result = score_plan(TASK, answer(plan), database)
        assert result.parts["parse_failed"] == 0.0 and 0.0 <= result.value <= 1.0
        assert 0.0 <= result.parts["commonsense"] <= 1.0


def test_wrong_types_score_what_they_can(db):
    plan = good_plan()
    plan["daily_plans"][1]["activities"] = "gone"  # day 2 unreadable: inbound train missing
    result = score_plan(TASK, answer(plan), db)
    assert result.value == pytest.approx(4 / 5) and result.parts["parse_failed"] == 0.0


def test_plan_block_forms():
    assert extract_plan("<plan>\n```json\n{\"a\": 1}\n```\n</plan>") == {"a": 1}
    assert extract_plan("<PLAN>{\"a\": 1}</PLAN> then <plan>{\"a\": 2}</plan>") == {"a": 2}
    assert extract_plan("<think><plan>{\"a\": 1}</plan></think>no plan") is None


@pytest.mark.parametrize("check, breaking", [
    ("valid_trip_duration", lambda p: p["daily_plans"].pop()),
    ("closed_loop_route_structure", lambda p: p["daily_plans"][1].update(current_city="from Nanjing to Wuhu")),
    ("seamless_intercity_transfers", lambda p: p["daily_plans"][0]["activities"][0]["details"].update(to="Wuhu Station")),
    ("validated_accommodation", lambda p: p["daily_plans"][0]["accommodation"].update(price_per_night=400)),
    ("validated_attractions", lambda p: p["daily_plans"][0]["activities"][5]["details"].update(cost=40)),
    ("validated_meals", lambda p: p["daily_plans"][0]["activities"][7]["details"].update(name="Pizza Place")),
    ("validated_transportation", lambda p: p["daily_plans"][0]["activities"][0]["details"].update(number="G1")),
    ("traceable_accommodation", lambda p: p["daily_plans"][0].pop("accommodation")),
    ("ends_with_accommodation", lambda p: p["daily_plans"][0]["activities"].pop()),
    ("essential_meal_coverage", lambda p: p["daily_plans"][0]["activities"][11].update(time_slot="14:30-15:30")),
    ("essential_attraction_coverage", lambda p: p["daily_plans"][1]["activities"][1].update(type="buffer")),
    ("no_time_overlaps", lambda p: p["daily_plans"][0]["activities"][1].update(time_slot="08:30-09:30")),
    ("attraction_visit_within_opening_hours", lambda p: p["daily_plans"][0]["activities"][5].update(time_slot="06:45-08:45")),
    ("dining_within_service_hours", lambda p: p["daily_plans"][0]["activities"][7].update(time_slot="09:00-10:00")),
    ("avoidance_of_closure_days", lambda p: p["daily_plans"][1]["activities"][1]["details"].update(name="Nanjing City Wall")),
    ("reasonable_duration_at_attractions", lambda p: p["daily_plans"][0]["activities"][5].update(time_slot="10:45-11:15")),
    ("reasonable_meal_duration", lambda p: p["daily_plans"][0]["activities"][7].update(time_slot="13:00-13:10")),
    ("cost_calculation_correctness", lambda p: p["budget_summary"].update(total_estimated_budget=2000)),
    ("diverse_meal_options", lambda p: p["daily_plans"][1]["activities"][3]["details"].update(name="Noodle Bar")),
    ("diverse_attraction_options", lambda p: p["daily_plans"][1]["activities"][1]["details"].update(name=str(p["daily_plans"][0]["activities"][9]["details"]["name"]))),
])
def test_each_commonsense_check_catches_its_fault(check, breaking, db):
    meta = dict(TASK["meta_info"], depart_weekday=7)  # day 2 is a Monday: the City Wall is closed
    assert commonsense.evaluate(good_plan(), meta, db)[check] is True
    plan = good_plan()
    breaking(plan)
    assert commonsense.evaluate(plan, meta, db)[check] is False


def test_database_checks_are_skipped_without_database():
    results = commonsense.evaluate(good_plan(), TASK["meta_info"], None)
    skipped = {name for name, value in results.items() if value is None}
    assert skipped == {"validated_accommodation", "validated_attractions", "validated_meals", "validated_transportation",
                       "attraction_visit_within_opening_hours", "dining_within_service_hours",
                       "avoidance_of_closure_days", "reasonable_duration_at_attractions", "reasonable_transfer_time"}


def test_check_reports_missing_files(tmp_path):
    lines = TravelEnv(task_file=str(tmp_path / "none.json")).check()
    assert len(lines) == 1 and str(tmp_path / "none.json") in lines[0]
    task_file = write_task_file(tmp_path / "tasks", [TASK, dict(TASK, id="8")])
    lines = TravelEnv(task_file=str(task_file), database_root=str(tmp_path / "db")).check()
    assert len(lines) == 1 and str(tmp_path / "db") in lines[0] and "Qwen/DeepPlanning" in lines[0]
    root = build_database(tmp_path / "db")
    lines = TravelEnv(task_file=str(task_file), database_root=str(root)).check()
    assert len(lines) == 1 and str(root / "id_8") in lines[0] and "database_en / database_zh" in lines[0]
    assert all("\n" not in line for line in lines)


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="plan_format"):
        TravelEnv(task_file="x", plan_format="pdf")
    with pytest.raises(ValueError, match="needs a converter model"):
        TravelEnv(task_file="x", plan_format="text")
    with pytest.raises(ValueError, match="language"):
        TravelEnv(task_file="x", language="fr")
    task_file = write_task_file(tmp_path / "tasks")
    other = tmp_path / "schema.json"
    other.write_text(json.dumps([{"type": "function", "function": {"name": "x"}}]))
    env = TravelEnv(task_file=str(task_file), tool_schema_file=str(other))
    assert env.tools(env.tasks()[0])[0]["function"]["name"] == "x"


def test_free_text_plans_are_scored_through_the_converter(tmp_path):
    """plan_format 'text': every answer goes through the converter; 'json': only answers without a readable
    block. The converter here is a stand-in that knows the right plan; a real one is a local model."""
    task_file = write_task_file(tmp_path / "tasks")
    root = build_database(tmp_path / "db")
    seen = []

    def stand_in(text):
        seen.append(text)
        return answer(good_plan())

    env = TravelEnv(task_file=str(task_file), database_root=str(root), plan_format="text", converter="stand-in")
    env._converter = stand_in
    task = env.tasks()[0]
    assert "<plan>" not in task.messages[0]["content"]  # the prompt asks for prose
    score = env.score(task, env.start(task), "Day 1: take the train ...")
    assert score.value == 1.0 and score.parts["converted"] == 1.0 and seen == ["Day 1: take the train ..."]
    env = TravelEnv(task_file=str(task_file), database_root=str(root), converter="stand-in")
    env._converter = stand_in
    assert env.score(task, env.start(task), answer(good_plan())).parts["converted"] == 0.0 and len(seen) == 1
    assert env.score(task, env.start(task), "no block").parts["converted"] == 1.0 and len(seen) == 2


def test_a_real_converter_model_that_writes_nonsense_scores_zero_without_raising(tmp_path):
    """PlanConverter end to end with a tiny random model: its output does not parse, so the plan scores 0,
    counted as parse_failed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lm.tokenizers import chat_char_tokenizer

    tok = chat_char_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "conv")
    tok.save_pretrained(tmp_path / "conv")
    task_file = write_task_file(tmp_path / "tasks")
    env = TravelEnv(task_file=str(task_file), plan_format="text", converter=str(tmp_path / "conv"),
                    converter_max_new_tokens=8)
    task = env.tasks()[0]
    score = env.score(task, env.start(task), "Day 1: a walk.")
    assert score.value == 0.0 and score.parts["parse_failed"] == 1.0 and score.parts["converted"] == 1.0
