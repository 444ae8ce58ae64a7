"""Benchmark specs, local and (mocked) hub loading, prompt format, the demo task hook."""

import json
import sys
import types

import pytest

from eval import benchmarks
from eval.benchmarks import BOXED_INSTRUCTION, BenchmarkError, load_benchmark, parse_spec


@pytest.fixture(autouse=True)
def fresh_benchmark_cache():
    # load_benchmark caches per spec; a test's fake hub or demo module must not leak into the next test.
    load_benchmark.cache_clear()
    yield
    load_benchmark.cache_clear()


def test_registered_names():
    assert {"math500", "aime24", "aime25", "dapo", "demo"} <= set(benchmarks.known_benchmarks())


def test_instruction_is_the_papers():
    assert BOXED_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."


def test_parse_spec_forms(shared_eval):
    path = shared_eval / "aime24.jsonl"
    assert parse_spec("math500") == ("math500", "math500")
    assert parse_spec(f"mine={path}") == ("mine", path)
    assert parse_spec(str(path)) == ("aime24", path)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("math5000", "unknown benchmark 'math5000' (known: aime24, aime25, dapo, demo, math500"),
        ("x=/no/such/file.jsonl", "benchmark file not found"),
        ("/no/such/file.jsonl", "benchmark file not found"),
        ("", "empty"),
    ],
)
def test_bad_specs_give_one_line_errors(spec, message):
    with pytest.raises(BenchmarkError, match=message.replace("(", r"\(")) as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)


def test_bad_names_are_refused(shared_eval):
    with pytest.raises(BenchmarkError, match="letters, digits"):
        parse_spec(f"my bench={shared_eval / 'aime24.jsonl'}")


def test_local_jsonl_loads_every_problem_with_the_boxed_instruction(shared_eval):
    for name, count in (("math500", 500), ("aime24", 30), ("aime25", 30)):
        bench = load_benchmark(f"{name}={shared_eval / name}.jsonl")
        assert bench.name == name
        assert len(bench.problems) == count
        assert len({p.id for p in bench.problems}) == count
        first = json.loads((shared_eval / f"{name}.jsonl").open().readline())
        assert bench.problems[0].id == first["id"]
        assert bench.problems[0].answer == first["answer"]
        assert bench.problems[0].prompt == first["problem"].strip() + "\n" + BOXED_INSTRUCTION
    assert len(load_benchmark(str(shared_eval / "math500.jsonl"), max_problems=7).problems) == 7


def test_local_benchmark_judges_with_the_math_grader(shared_eval):
    bench = load_benchmark(str(shared_eval / "aime24.jsonl"), max_problems=1)
    answer = bench.problems[0].answer
    assert bench.grade(f"... \\boxed{{{answer}}}", answer, 5.0)
    assert not bench.grade("... \\boxed{0}", answer, 5.0)
    assert bench.extract("so \\boxed{ 17 }") == "17"


def test_malformed_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "no answer"}\n')
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:2: .*problem and answer"):
        load_benchmark(str(bad))
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\nnot json\n')
    with pytest.raises(BenchmarkError, match=r"bad.jsonl:2: not valid JSON"):
        load_benchmark(str(bad))
    bad.write_text('{"id": "a", "problem": "p", "answer": "2"}\n{"id": "a", "problem": "q", "answer": "3"}\n')
    with pytest.raises(BenchmarkError, match="appears twice"):
        load_benchmark(str(bad))
    bad.write_text("\n")
    with pytest.raises(BenchmarkError, match="no problems"):
        load_benchmark(str(bad))


def test_ids_default_to_name_and_index(tmp_path):
    f = tmp_path / "tiny.jsonl"
    f.write_text('{"problem": "1+1?", "answer": 2}\n{"problem": "2+2?", "answer": "4"}\n')
    bench = load_benchmark(str(f))
    assert [p.id for p in bench.problems] == ["tiny-000", "tiny-001"]
    assert bench.problems[0].answer == "2"


def test_hub_benchmarks_use_the_named_sources(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, split):
        calls.append((hub_id, split))
        return datasets.Dataset.from_list(
            [{"problem": f"What is {i}+1?", "answer": i + 1, "solution": "..."} for i in range(5)]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    math500 = load_benchmark("math500", max_problems=3)
    assert calls[-1] == ("HuggingFaceH4/MATH-500", "test")
    assert [p.id for p in math500.problems] == ["math500-000", "math500-001", "math500-002"]
    assert math500.problems[1].answer == "2"  # numbers become strings
    assert math500.problems[1].prompt == "What is 1+1?\n" + BOXED_INSTRUCTION
    load_benchmark("aime24")
    assert calls[-1] == ("HuggingFaceH4/aime_2024", "train")
    assert len(load_benchmark("aime25").problems) == 5
    assert calls[-1] == ("math-ai/aime25", "test")


def test_dapo_strips_its_answer_format_and_duplicates(monkeypatch):
    import datasets

    def prompt(problem):
        return [{"role": "user", "content": benchmarks._DAPO_PREFIX + problem + benchmarks._DAPO_SUFFIX}]

    rows = [
        {"prompt": prompt("Find x."), "reward_model": {"ground_truth": "3"}, "extra_info": {"index": "u1"}},
        {"prompt": prompt("Find x."), "reward_model": {"ground_truth": "3"}, "extra_info": {"index": "u1"}},
        {"prompt": prompt("Find y."), "reward_model": {"ground_truth": "4"}, "extra_info": {"index": "u2"}},
    ]
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: rows)
    bench = load_benchmark("dapo")
    assert [(p.id, p.answer) for p in bench.problems] == [("dapo-u1", "3"), ("dapo-u2", "4")]
    assert bench.problems[0].prompt == "Find x.\n" + BOXED_INSTRUCTION
    assert "Answer:" not in bench.problems[0].prompt


def test_hub_failure_is_one_line_with_the_local_alternative(monkeypatch):
    import datasets

    def offline(hub_id, split):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BenchmarkError, match=r"aime25=PATH.jsonl") as info:
        load_benchmark("aime25")
    assert "\n" not in str(info.value)


def test_demo_benchmark_is_the_demo_tasks_held_out_problems_and_grader():
    from demo import task

    bench = load_benchmark("demo", max_problems=4)
    expected = task.eval_problems(4, benchmarks.DEMO_SEED)
    assert [p.prompt for p in bench.problems] == [r["prompt"] for r in expected]  # no boxed instruction
    assert [p.answer for p in bench.problems] == [str(r["answer"]) for r in expected]
    first = expected[0]
    worked = task.solution(*map(int, first["prompt"].split("*")))
    assert bench.grade(worked, str(first["answer"]), 5.0)
    assert not bench.grade(worked[:-1] + ("0" if worked[-1] != "0" else "1"), str(first["answer"]), 5.0)
    assert bench.extract(worked) == task.extract_answer(worked)
    assert len(load_benchmark("demo").problems) == benchmarks.DEMO_PROBLEMS
