"""The upstream diff reads verl's console log and generation dumps and lines them up with our run.

The upstream log, dumps and our run directory are TEST FIXTURES with
fabricated numbers, written in tmp_path in each side's real format.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from scripts.paper.upstream_diff import (
    DEFAULT_SOURCE_MAP, _bootstrap_best, dump_metrics, main, parse_console_log, upstream_validation,
)

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
        "math500/std_per_problem@16": 25.0,  # verl's std@16: not our std@16, so not under that name
        "math500/best@16_bootstrap": 90.0,  # verl's bootstrap best@16/mean: not pass@16; its /std is not a metric
        "aime24/mean@16": 6.25,
    }
    assert upstream_validation(steps[5], {**DEFAULT_SOURCE_MAP, "math_dapo": "dapo"})["dapo/mean@16"] == pytest.approx(30.0)
    # maj@16/mean is dropped: the reference reward gives no prediction, every vote ties
    assert not any("maj" in name for name in upstream_validation(steps[5], DEFAULT_SOURCE_MAP))


def _pstd(xs):
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


def test_bootstrap_expectation_matches_a_simulation_of_verls_draw():
    """best@k_bootstrap on our side is the exact expectation of verl's draw (k of k with replacement, best kept)."""
    rng = random.Random(0)
    for scores in ([1, 0, 0, 0], [0.0, 0.5, 1.0, 0.5, 0.25], [0, 0, 0], [1, 1]):
        draws = [max(rng.choice(scores) for _ in scores) for _ in range(40000)]
        assert _bootstrap_best(list(map(float, scores))) == pytest.approx(sum(draws) / len(draws), abs=0.01)
    # 0/1 scores: 1 - (1 - c/k)^k, below pass@k (1.0 here) as verl's estimate is
    assert _bootstrap_best([1.0, 0.0, 0.0, 0.0]) == pytest.approx(1 - 0.75 ** 4)


def test_dumps_give_exact_per_benchmark_metrics_and_regrade(tmp_path):
    problems = {"math500": {"What is 1+1?": "2", "What is 2+3?": "5"}, "aime24": {"Find the number of primes below 30.": "10"}}
    scores = {  # prompt -> 4 (score, output) samples; upstream graded 1/2 as wrong, math-verify takes 0.5 = 1/2 too
        "<|im_start|>user\nWhat is 1+1?\n\nLet's think step by step": [(1, "\\boxed{2}")] * 3 + [(0, "\\boxed{4/2}")],
        "<|im_start|>user\nWhat is 2+3?\n\nLet's think step by step": [(0, "\\boxed{6}")] * 4,
        "<|im_start|>user\nFind the number of primes below 30.\n\nLet's think": [(0, "no")] * 3 + [(1, "\\boxed{10}")],
    }
    dump = tmp_path / "5.jsonl"
    dump.write_text("".join(json.dumps({"input": p, "output": out, "score": float(sc), "step": 5}) + "\n"
                            for p, samples in scores.items() for sc, out in samples))
    got = dump_metrics(dump, problems, regrade=True)
    m1, m2, a1 = ([float(sc) for sc, _ in samples] for samples in scores.values())
    assert got["math500/mean@4"] == pytest.approx(100 * (3 + 0) / 8)
    assert got["math500/pass@4"] == pytest.approx(100 * (1 + 0) / 2)
    assert got["math500/std_per_problem@4"] == pytest.approx(100 * (_pstd(m1) + _pstd(m2)) / 2)
    assert got["math500/best@4_bootstrap"] == pytest.approx(100 * ((1 - 0.25 ** 4) + 0) / 2)
    assert got["aime24/mean@4"] == pytest.approx(25.0)
    assert got["aime24/pass@4"] == pytest.approx(100.0)
    # math-verify accepts 4/2 = 2, the upstream score did not: 4 of 8 right instead of 3
    assert got["math500/mean@4 [math-verify]"] == pytest.approx(50.0)
    assert got["aime24/mean@4 [math-verify]"] == pytest.approx(25.0)
    assert "math500/mean@4 [math-verify]" not in dump_metrics(dump, problems)  # only when asked


def _our_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    records = [
        {"step": 1, "opd/loss": 0.3, "opd/entropy": 0.9, "opd/num_tokens": 4000, "timing/step_s": 100.0,
         "perf/max_memory_allocated_gb": 40.0},
        {"step": 2, "opd/loss": 0.26, "opd/entropy": 0.8},
        {"step": 5, "opd/loss": 0.13, "val/math500/mean@16": 60.0, "val/aime24/mean@16": 12.5, "val/heldout/mean@16": 31.0,
         "val/math500/std@16": 2.0},
        {"step": 10, "opd/loss": 0.11, "opd/grad_norm": "nan"},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, step, mean in (("step_000005", 5, 61.0), ("final", 10, 77.5)):
        path = run_dir / "eval" / name / "summary.json"
        path.parent.mkdir(parents=True)
        bench = {"mean@k": mean, "std@k": 20.0, "pass@k": 92.0, "maj@k": 72.0, "n_problems": 500, "mean_length": 800.0,
                 "truncation_rate": 0.0}
        path.write_text(json.dumps({"step": step, "k": 16, "benchmarks": {"math500": bench}}))
    # final samples: two math500 problems x 16; problem a right 8 times (one of them as 0.5 for 1/2), b never
    samples = [{"benchmark": "math500", "problem_id": "a", "sample": j, "response": "\\boxed{0.5}" if j == 0 else
                ("\\boxed{\\frac{1}{2}}" if j < 8 else "\\boxed{1}"), "correct": j < 8, "answer": "\\frac{1}{2}"}
               for j in range(16)]
    samples += [{"benchmark": "math500", "problem_id": "b", "sample": j, "response": "\\boxed{3}", "correct": False,
                 "answer": "7"} for j in range(16)]
    (run_dir / "eval" / "final" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))


def _rows(stdout: str) -> dict[tuple[str, str], tuple]:
    out = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("step", "---"):
            out[(cells[0], cells[1])] = (*(float(c) for c in cells[2:5]), cells[5])
    return out


def test_diff_table_compares_the_same_statistics(tmp_path, capsys):
    log = tmp_path / "upstream.log"
    log.write_text(VERL_LOG + "(TaskRunner pid=4242) step:11 - val-core/math/acc/mean@16:0.75 - "
                   "val-aux/math/acc/std@16:0.3 - val-core/math/acc/best@16/mean:0.4\n")
    _our_run(tmp_path / "run")
    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "diff.md")]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    # step 5: our eval summary (61.0) wins over the metrics.jsonl value (60.0); graders named
    assert rows[("5", "math500/mean@16")] == (62.5, 61.0, -1.5, "reference string match / math-verify")
    assert rows[("5", "aime24/mean@16")][:3] == (12.5, 12.5, 0.0)
    assert rows[("5", "heldout/mean@16")][:3] == (30.0, 31.0, 1.0)
    assert not any("maj" in metric or metric == "opd/loss" or "/std@" in metric for _, metric in rows)
    # training-only steps are left out unless asked for
    assert not any(step in ("1", "2") for step, _ in rows)
    final = "final (upstream step 11)"
    assert rows[(final, "math500/mean@16")][:3] == (75.0, 77.5, 2.5)
    # verl's statistics computed from our 32 samples: per-problem std (0.5 and 0) averaged; bootstrap 1 - 0.5^16 and 0
    assert rows[(final, "math500/std_per_problem@16")][:2] == (30.0, pytest.approx(25.0))
    assert rows[(final, "math500/best@16_bootstrap")][:2] == (40.0, pytest.approx(100 * (1 - 0.5 ** 16) / 2, abs=1e-3))
    assert "std_per_problem@k: verl's std@k" in out and (tmp_path / "diff.md").read_text() == out

    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run"), "--all-steps"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows[("1", "opd/entropy")][:2] == (0.875, 0.9)
    assert rows[("1", "timing/step_s")][:3] == (300.0, 100.0, -200.0)
    assert ("10", "opd/grad_norm") not in rows  # "nan" on our side is not compared
    assert ("1", "opd/num_tokens") not in rows  # per rank upstream: only with --upstream-world-size


def test_num_tokens_is_compared_on_the_same_footing_and_regrade_adds_rows(tmp_path, capsys):
    log = tmp_path / "upstream.log"
    log.write_text("step:1 - opd/num_tokens:500 - opd/entropy:0.8\nstep:10 - val-core/math/acc/mean@16:0.25\n")
    _our_run(tmp_path / "run")
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    dumps.joinpath("10.jsonl").write_text("".join(
        json.dumps({"input": "user: What is half of one?", "output": "\\boxed{0.5}", "gts": "\\frac{1}{2}", "score": 0.0})
        + "\n" for _ in range(16)))
    bench = tmp_path / "math500.jsonl"
    bench.write_text(json.dumps({"problem": "What is half of one?", "answer": "\\frac{1}{2}"}) + "\n")
    argv = ["--upstream-log", str(log), "--run", str(tmp_path / "run"), "--all-steps", "--upstream-world-size", "8",
            "--upstream-dumps", str(dumps), "--bench", f"math500={bench}", "--regrade"]
    assert main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows[("1", "opd/num_tokens")][:2] == (4000.0, 4000.0)  # 500 per rank x 8 ranks
    final = "final (upstream step 10)"
    # upstream's own score (0) vs our samples by string match: 0.5 is not \frac{1}{2} as a string, 7 of 16 match
    assert rows[(final, "math500/mean@16 [string match]")][:2] == (0.0, pytest.approx(100 * 7 / 32, abs=0.01))
    # upstream's outputs regraded by math-verify (0.5 = 1/2: all right) vs ours (math-verify natively)
    assert rows[(final, "math500/mean@16 [math-verify]")] == (100.0, 77.5, -22.5, "math-verify (regraded) / math-verify")
    assert rows[(final, "math500/pass@16")][:2] == (0.0, 92.0)  # exact from the dump
    assert main(argv[:-1] + ["--upstream-dumps", str(dumps)]) == 0  # without --regrade: no regraded rows
    assert not any("[" in metric for _, metric in _rows(capsys.readouterr().out))
    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run"), "--regrade"]) == 2
    assert "--regrade needs --upstream-dumps" in capsys.readouterr().err


def test_nothing_in_common_is_an_error_that_lists_both_sides(tmp_path, capsys):
    log = tmp_path / "upstream.log"
    log.write_text("step:3 - val-core/gsm8k/acc/mean@16:0.5\n")
    _our_run(tmp_path / "run")
    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "gsm8k/mean@16" in err and "math500/mean@16" in err
    assert main(["--upstream-log", str(tmp_path / "missing.log"), "--run", str(tmp_path / "run")]) == 2


# ----------------------------------------------------------------------------
# CSV exports (issue 26 item 17): third parties publish the reference implementation's results as CSV files with
# verl's metric names; the format is detected, and one line says what was read or why nothing matched.

TRAINING_CSV = """\
step,opd/loss,opd/entropy,opd/grad_norm,tip/selected_fraction,timing/step_s
1,0.31,0.875,1.5,0.5,300
2,0.25,0.8,1.25,0.5,290
5,0.125,0.7,nan,0.5,
"""
EVAL_CSV = """\
step,MATH-500/mean@16,aime24/mean@16,val-core/math_dapo/acc/mean@16
0,0.5,0.0625,0.25
5,0.625,0.125,0.3
"""


def _upstream(tmp_path, name: str, text) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_csv_exports_are_read_and_mapped(tmp_path, capsys):
    train = _upstream(tmp_path, "training_metrics.csv", TRAINING_CSV)
    evals = _upstream(tmp_path, "eval_curve.csv", "\ufeff" + EVAL_CSV)  # a spreadsheet's BOM
    _our_run(tmp_path / "run")
    argv = ["--upstream-log", str(train), "--upstream-log", str(evals), "--run", str(tmp_path / "run"),
            "--map", "MATH-500=math500", "--all-steps"]
    assert main(argv) == 0
    out = capsys.readouterr()
    rows = _rows(out.out)
    assert rows[("5", "math500/mean@16")][:3] == (62.5, 61.0, -1.5)  # fractions upstream, percent in the table
    assert rows[("5", "aime24/mean@16")][:2] == (12.5, 12.5)
    assert rows[("5", "heldout/mean@16")][:2] == (pytest.approx(30.0), 31.0)  # a full verl key as a column
    assert rows[("1", "opd/entropy")][:2] == (0.875, 0.9) and rows[("1", "timing/step_s")][:2] == (300.0, 100.0)
    assert ("5", "timing/step_s") not in rows and ("10", "opd/grad_norm") not in rows  # empty and nan cells
    assert not any(metric == "opd/loss" for _, metric in rows)  # still not compared (module docstring)
    said = out.err.splitlines()
    assert said[0] == (f"upstream {train}: CSV export, 5 metrics (opd/entropy, opd/grad_norm, opd/loss, "
                       "timing/step_s, tip/selected_fraction), 3 steps (1-5)"), out.err
    assert said[1] == (f"upstream {evals}: CSV export, 3 metrics (MATH-500/mean@16 as math500/mean@16, "
                       "aime24/mean@16, val-core/math_dapo/acc/mean@16 as heldout/mean@16), 2 steps (0-5)"), out.err
    # without --map the column keeps its own name and meets nothing of ours
    assert main(argv[:-3] + ["--all-steps"]) == 0
    assert not any(metric.startswith("MATH-500") or step == "5" and metric == "math500/mean@16"
                   for step, metric in _rows(capsys.readouterr().out))


def test_the_console_log_says_what_was_read(tmp_path, capsys):
    log = _upstream(tmp_path, "upstream.log", VERL_LOG)
    _our_run(tmp_path / "run")
    assert main(["--upstream-log", str(log), "--run", str(tmp_path / "run")]) == 0
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"upstream {log}: verl console log, ") and first.endswith("5 steps (0-10)"), first


@pytest.mark.parametrize("name,content,why", [
    ("empty.log", b"", "empty file"),
    ("blank.csv", b"\n  \n", "empty file"),
    ("weights.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary file"),
    ("noise.dat", bytes(range(1, 256)) * 3, "binary file"),  # no NUL byte, not text either
    ("notes.txt", b"the run went well\nloss fell\n", "unknown format"),
    ("other.csv", b"epoch,loss\n1,0.5\n", "unknown format: a CSV without a step column (columns: epoch, loss)"),
    ("bad_step.csv", b"step,opd/loss\n1,0.5\nthree,0.4\n", "line 3: step 'three' is not a whole number"),
    ("percent.csv", b"step,math500/mean@16\n5,62.5\n", "column math500/mean@16 holds 62.5 at step 5"),
], ids=["empty", "blank", "binary", "noise", "prose", "no-step-column", "bad-step", "percent"])
def test_unreadable_upstream_files_are_one_error_line(tmp_path, capsys, name, content, why):
    path = _upstream(tmp_path, name, content)
    _our_run(tmp_path / "run")
    out_file = tmp_path / "diff.md"
    assert main(["--upstream-log", str(path), "--run", str(tmp_path / "run"), "--out", str(out_file)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: upstream {path}: ") and why in err[0], err
    assert "console log" in err[0] and "CSV" in err[0]  # says what it accepts
    assert not out_file.exists()


def test_no_common_step_is_said_in_one_line(tmp_path, capsys):
    evals = _upstream(tmp_path, "eval_curve.csv", "step,gsm8k/mean@16\n100,0.5\n200,0.6\n")
    _our_run(tmp_path / "run")
    assert main(["--upstream-log", str(evals), "--run", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"upstream {evals}: CSV export, 1 metric")
    assert err[1] == ("no common step: upstream steps 100-200 (2), ours 1-5 (3); the last upstream evaluation "
                      "(step 200) and our final one share no metric"), err
    assert "gsm8k/mean@16" in err[2] and "math500/mean@16" in err[3]
