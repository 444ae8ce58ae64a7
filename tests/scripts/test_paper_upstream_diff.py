"""The upstream diff reads verl's console log and generation dumps and lines them up with our run.

The upstream log, dumps and our run directory are TEST FIXTURES with
fabricated numbers, written in tmp_path in each side's real format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts.paper.upstream_diff import DEFAULT_SOURCE_MAP, dump_metrics, main, parse_console_log, upstream_validation

# verl's console logger: `step:N - key:value - ...`, values through pprint.pformat
# (numpy scalars print as np.float64(...)), lines prefixed by Ray's actor tag, and
# unrelated console lines in between.
VERL_LOG = """\
(TaskRunner pid=4242) Training from scratch
(TaskRunner pid=4242) step:0 - val-core/math/acc/mean@16:np.float64(0.5) - val-aux/math/acc/std@16:np.float64(0.25) - val-core/math/acc/best@16/mean:np.float64(0.9) - val-aux/math/acc/best@16/std:0.01 - val-aux/math/reward/mean@16:0.1 - val-core/aime24/acc/mean@16:0.0625
OPD Training:   0%|          | 0/10 [00:00<?, ?it/s]
(TaskRunner pid=4242) step:1 - timing/generate_s:120.5 - opd/accuracy:0.4 - opd/loss:0.3125 - opd/entropy:0.875 - training/global_step:1 - timing/step_s:300.0
(TaskRunner pid=4242) step:2 - opd/loss:0.25 - opd/entropy:0.8 - timing/step_s:290.0
\x1b[36m(TaskRunner pid=4242)\x1b[0m step:5 - opd/loss:0.125 - val-core/math/acc/mean@16:np.float64(0.625) - val-core/aime24/acc/mean@16:0.125 - val-core/math_dapo/acc/mean@16:0.3 - val-core/math/acc/maj@16/mean:0.7
(TaskRunner pid=4242) step:10 - opd/loss:0.1 - val-core/math/acc/mean@16:0.75 - val-core/aime24/acc/mean@16:nan
"""


def test_console_log_parser_reads_records_and_skips_the_rest():
    steps = parse_console_log(VERL_LOG)
    assert sorted(steps) == [0, 1, 2, 5, 10]
    assert steps[0]["val-core/math/acc/mean@16"] == 0.5
    assert steps[1] == {"timing/generate_s": 120.5, "opd/accuracy": 0.4, "opd/loss": 0.3125, "opd/entropy": 0.875,
                        "training/global_step": 1.0, "timing/step_s": 300.0}
    assert steps[5]["val-core/math/acc/mean@16"] == 0.625  # behind an ANSI-coloured prefix
    assert "val-core/aime24/acc/mean@16" not in steps[10]  # nan is no number to compare


def test_validation_keys_map_to_our_benchmark_names_in_percent():
    steps = parse_console_log(VERL_LOG)
    assert upstream_validation(steps[0], DEFAULT_SOURCE_MAP) == {
        "math500/mean@16": 50.0,  # acc wins over the reward variable
        "math500/std@16": 25.0,
        "math500/pass@16": 90.0,  # best@16/mean; best@16/std is not a metric of ours
        "aime24/mean@16": 6.25,
    }
    assert upstream_validation(steps[5], {**DEFAULT_SOURCE_MAP, "math_dapo": "dapo"})["dapo/mean@16"] == pytest.approx(30.0)
    assert upstream_validation(steps[5], DEFAULT_SOURCE_MAP)["math500/maj@16"] == pytest.approx(70.0)


def test_dumps_give_exact_per_benchmark_metrics(tmp_path):
    problems = {"math500": ["What is 1+1?", "What is 2+3?"], "aime24": ["Find the number of primes below 30."]}
    scores = {  # prompt -> 4 sample scores
        "<|im_start|>user\nWhat is 1+1?\n\nLet's think step by step": [1, 1, 0, 1],
        "<|im_start|>user\nWhat is 2+3?\n\nLet's think step by step": [0, 0, 0, 0],
        "<|im_start|>user\nFind the number of primes below 30.\n\nLet's think": [0, 1, 0, 0],
    }
    dump = tmp_path / "5.jsonl"
    dump.write_text("".join(json.dumps({"input": p, "output": "...", "gts": "2", "score": float(s), "step": 5}) + "\n"
                            for p, ss in scores.items() for s in ss))
    got = dump_metrics(dump, problems)

    def pstd(xs):
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))

    m1, m2, a1 = scores.values()
    assert got["math500/mean@4"] == pytest.approx(100 * (3 + 0) / 8)
    assert got["math500/pass@4"] == pytest.approx(100 * (1 + 0) / 2)
    assert got["math500/std@4"] == pytest.approx(100 * (pstd(m1) + pstd(m2)) / 2)
    assert got["aime24/mean@4"] == pytest.approx(25.0)
    assert got["aime24/pass@4"] == pytest.approx(100.0)


def _our_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    records = [
        {"step": 1, "opd/loss": 0.3, "opd/entropy": 0.9, "timing/step_s": 100.0, "perf/max_memory_allocated_gb": 40.0},
        {"step": 2, "opd/loss": 0.26, "opd/entropy": 0.8},
        {"step": 5, "opd/loss": 0.13, "val/math500/mean@16": 60.0, "val/aime24/mean@16": 12.5, "val/heldout/mean@16": 31.0},
        {"step": 10, "opd/loss": 0.11, "opd/grad_norm": "nan"},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, step, mean in (("step_000005", 5, 61.0), ("final", 10, 77.5)):
        path = run_dir / "eval" / name / "summary.json"
        path.parent.mkdir(parents=True)
        bench = {"mean@k": mean, "std@k": 20.0, "pass@k": 92.0, "maj@k": 72.0, "n_problems": 500, "mean_length": 800.0,
                 "truncation_rate": 0.0}
        path.write_text(json.dumps({"step": step, "k": 16, "benchmarks": {"math500": bench}}))


def _rows(stdout: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] not in ("step", "---"):
            out[(cells[0], cells[1])] = tuple(float(c) for c in cells[2:])
    return out


def test_diff_table_lines_up_steps_and_final(tmp_path, capsys):
    log = tmp_path / "upstream.log"
    log.write_text(VERL_LOG)
    _our_run(tmp_path / "run")
    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "diff.md")]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    # step 5: our eval summary (61.0) wins over the metrics.jsonl value (60.0)
    assert rows[("5", "math500/mean@16")] == (62.5, 61.0, -1.5)
    assert rows[("5", "aime24/mean@16")] == (12.5, 12.5, 0.0)
    assert rows[("5", "heldout/mean@16")] == (30.0, 31.0, 1.0)
    assert rows[("5", "math500/maj@16")] == (70.0, 72.0, 2.0)
    assert rows[("5", "opd/loss")] == (0.125, 0.13, pytest.approx(0.005))
    # training-only steps are left out unless asked for
    assert not any(step in ("1", "2") for step, _ in rows)
    assert rows[("final (upstream step 10)", "math500/mean@16")] == (75.0, 77.5, 2.5)
    assert (tmp_path / "diff.md").read_text() == out

    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run"), "--all-steps"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows[("1", "opd/entropy")] == (0.875, 0.9, pytest.approx(0.025))
    assert rows[("1", "timing/step_s")] == (300.0, 100.0, -200.0)
    assert ("10", "opd/grad_norm") not in rows  # "nan" on our side is not compared


def test_nothing_in_common_is_an_error_that_lists_both_sides(tmp_path, capsys):
    log = tmp_path / "upstream.log"
    log.write_text("step:3 - val-core/gsm8k/acc/mean@16:0.5\n")
    _our_run(tmp_path / "run")
    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "gsm8k/mean@16" in err and "math500/mean@16" in err
    assert main(["--upstream-log", str(tmp_path / "missing.log"), "--run", str(tmp_path / "run")]) == 2
