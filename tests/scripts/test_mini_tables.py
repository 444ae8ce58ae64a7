"""scripts/mini_tables.sh: the quick miniature produces every table; aggregation checked by hand."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from scripts import mini_tables as mini

REPO = Path(__file__).resolve().parents[2]


def run_script(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "scripts" / "mini_tables.sh"), "--threads", "1", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def table_rows(markdown: str, title: str) -> dict[str, list[str]]:
    """Method -> cells of one table's body rows."""
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("| ").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in rows[1:]}  # rows[0] is the header


def floats(cell: str) -> list[float]:
    return [float(part) for part in cell.replace("±", "/").split("/")]


@pytest.mark.slow  # 3.5-4 min (a process per method); .ci/run runs it after the main suite
def test_quick_run_produces_every_table_and_a_rerun_reuses_it(tmp_path):
    out = tmp_path / "mini"
    caches = (f"demo.cache_dir={tmp_path / 'cache'}", f"agent_demo.cache_dir={tmp_path / 'cache'}")
    proc = run_script("--quick", "--out", str(out), *caches)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    markdown = (out / "mini_tables.md").read_text()
    assert markdown in proc.stdout
    for title, methods in mini.TABLES.values():
        rows = table_rows(markdown, title)
        assert list(rows) == list(methods), title
        for method, cells in rows.items():
            if mini.is_agentic(method):  # table 7: Best@k beside Avg@k
                best, cells = cells[2], cells[:2] + cells[3:]
                assert 0.0 <= float(best) <= 100.0
            accuracy, delta, kept, quadrants, kept_quadrants, memory, step_time = cells[1:]
            assert 0.0 <= float(accuracy) <= 100.0  # one seed: a bare mean
            assert delta == "reference" if method == methods[0] else abs(float(delta)) <= 100.0
            assert 0.0 < float(kept) <= 100.0
            for cell in (quadrants, kept_quadrants):
                shares = floats(cell)
                assert len(shares) == 4 and abs(sum(shares) - 100.0) < 0.5, (method, cell)
            assert float(memory) > 0 and float(step_time) > 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["runs"]) == sorted(mini.METHODS) and not results["failed"]
    assert all(len(runs) == 1 and runs[0]["steps"] == 3 for runs in results["runs"].values())

    again = run_script("--quick", "--out", str(out), *caches)
    assert again.returncode == 0 and f"0 runs launched, {len(mini.METHODS)} reused" in again.stdout

    longer = run_script("--quick", "--steps", "4", "--only", "all", "--out", str(out),
                        f"demo.cache_dir={tmp_path / 'cache'}")
    assert longer.returncode == 1 and "holds a 3-step run, not 4" in longer.stdout


def test_a_failed_run_is_reported_and_the_others_still_run(tmp_path):
    out = tmp_path / "mini"
    # valid settings (the script checks every config before the first run), but train.py refuses the data
    proc = run_script("--only", "all,soft_or_50", "--steps", "1", "--seeds", "0", "--out", str(out),
                      f"demo.cache_dir={tmp_path / 'cache'}", "demo.teacher_steps=2", "demo.student_steps=2",
                      "demo.eval_problems=8", "data.train_path=./no/such/prompts.jsonl", timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[1/2] all_s0: FAILED" in proc.stdout and "[2/2] soft_or_50_s0: FAILED" in proc.stdout
    assert "no/such/prompts.jsonl" in (out / "logs" / "all_s0.log").read_text()
    rows = table_rows((out / "mini_tables.md").read_text(), mini.TABLES[6][0])
    assert rows["soft_or_50"][1] == mini.MISSING and "soft_or_bottom_50" not in rows


@pytest.mark.parametrize("args, message", [
    (["--only", "bogus"], "unknown method 'bogus'"),
    (["--seeds", "0,x"], "--seeds"),
    (["--steps", "0"], "--steps 0"),
    (["train.seed=3"], "use --seeds"),
    (["tip.ratio=0.3"], "use --only"),
    (["nonsense"], "section.key=value"),
    (["--steps", "2", "train.no_such_key=1"], "no_such_key"),
    (["demo.teacher_layers=-1"], "below the minimum 1"),  # the typed demo: section, checked before any run
])
def test_bad_command_lines_are_one_line_errors(args, message, tmp_path, capsys):
    assert mini.main([*args, "--out", str(tmp_path / "mini")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "mini").exists()


def write_run(run_dir: Path, after: float, steps: list[dict], before: float = 10.0, teacher: float = 95.0,
              extra_lines: str = "") -> None:
    """A finished run as train.py leaves it: summary.json, metrics.jsonl (eval and step records), config.yaml."""
    run_dir.mkdir(parents=True)
    summary = {"teacher_accuracy": teacher, "student_accuracy_before": before, "student_accuracy_after": after,
               "wall_time_s": 1.0, "steps": len(steps),
               "benchmarks": {"final": {"demo": {"mean@k": after, "n_problems": 200}}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    lines = [json.dumps({"step": 0, "val/demo/mean@4": before})]
    for i, step in enumerate(steps, 1):
        kept, tokens, q_all, q_kept, memory, seconds = step
        record = {"step": i, "opd/num_kept": kept, "opd/num_tokens": tokens, "perf/max_rss_gb": memory,
                  "timing/step_s": seconds}
        for q, share, kept_share in zip(mini.QUADRANTS, q_all, q_kept):
            record[f"tip/{q}_share"], record[f"tip/kept_{q}_share"] = share, kept_share
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + extra_lines)
    (run_dir / "config.yaml").write_text("eval:\n  k: 4\n")


QA = (0.4, 0.1, 0.1, 0.4)  # quadrant shares of all tokens
QK = (0.7, 0.2, 0.1, 0.0)  # of kept tokens


def test_aggregation_matches_a_hand_computation(tmp_path):
    # all: after 10, 20, 30 -> 20.0 ± 10.0 (sample std); every token kept
    for seed, after in enumerate((10.0, 20.0, 30.0)):
        write_run(tmp_path / f"all_s{seed}", after, [(100, 100, QA, QA, 1.0, 0.2)] * 2)
    # soft_or_50: after 40, 50, 90 -> mean 60, sample std sqrt((400 + 100 + 900) / 2) = 26.46
    write_run(tmp_path / "soft_or_50_s0", 40.0,
              [(50, 100, QA, QK, 1.0, 0.1), (30, 100, (0.2, 0.3, 0.3, 0.2), (0.5, 0.4, 0.1, 0.0), 2.0, 0.3)],
              # a resumed run logged step 2 again (the last record counts) and a killed one left half a line
              extra_lines=json.dumps({"step": 2, "opd/num_kept": 30, "opd/num_tokens": 100, "perf/max_rss_gb": 2.5,
                                      "timing/step_s": 0.5, **{f"tip/{q}_share": s for q, s in
                                                              zip(mini.QUADRANTS, (0.2, 0.3, 0.3, 0.2))},
                                      **{f"tip/kept_{q}_share": s for q, s in
                                         zip(mini.QUADRANTS, (0.5, 0.4, 0.1, 0.0))}}) + '\n{"step": 3, "opd/n')
    write_run(tmp_path / "soft_or_50_s1", 50.0, [(50, 100, QA, QK, 1.5, 0.2)] * 2)
    write_run(tmp_path / "soft_or_50_s2", 90.0, [(50, 100, QA, QK, 1.2, 0.4)] * 2)

    runs = {m: [mini.read_run(tmp_path / f"{m}_s{s}") for s in range(3)] for m in ("all", "soft_or_50")}
    rows = {m: mini.aggregate(rs) for m, rs in runs.items()}
    rows["soft_or_bottom_50"] = mini.aggregate([])  # no run finished
    so = rows["soft_or_50"]
    assert so.after == [40.0, 50.0, 90.0] and so.after_mean == pytest.approx(60.0)
    assert so.after_std == pytest.approx((1400 / 2) ** 0.5)
    # kept: seed 0 (50 + 30) / 200 = 40%, seeds 1 and 2 50% -> 46.67
    assert so.kept_share == pytest.approx((40 + 50 + 50) / 3)
    # Q1 of all tokens: seed 0 mean(40, 20) = 30%, seeds 1, 2 40% -> 36.67; kept Q1: (60 + 70 + 70) / 3
    assert so.quadrants["q1"] == pytest.approx((30 + 40 + 40) / 3)
    assert so.quadrants["kept_q1"] == pytest.approx((60 + 70 + 70) / 3)
    assert so.peak_memory_gb == 2.5  # the duplicate step's memory, max over seeds
    assert so.step_time_s == pytest.approx(0.3)  # median of 0.1, 0.5, 0.2, 0.2, 0.4, 0.4

    table = mini.render_table(6, rows, runs, seeds=3)
    assert "Student before OPD: 10.0 ± 0.0 · teacher: 95.0 ± 0.0 (mean@4 %, over the 6 runs" in table
    body = table_rows(table, mini.TABLES[6][0])
    assert body["all"][1:4] == ["20.0 ± 10.0", "reference", "100.0"]
    assert body["soft_or_50"][1:] == ["60.0 ± 26.5", "+40.0", "46.7", "36.7 / 13.3 / 13.3 / 36.7",
                                      "66.7 / 23.3 / 10.0 / 0.0", "2.50", "0.300"]
    assert body["soft_or_bottom_50"][1:] == [mini.MISSING] * 7

    fewer = {"all": mini.aggregate(runs["all"][:2])}
    assert table_rows(mini.render_table(3, fewer, {"all": runs["all"][:2]}, seeds=3), mini.TABLES[3][0])[
        "all"][1] == "15.0 ± 7.1 (n=2)"
