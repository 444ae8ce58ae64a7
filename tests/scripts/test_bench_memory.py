"""The memory benchmark script runs and reports every variant (a smoke test, not a timing test)."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_memory_reports_all_variants(tmp_path):
    out_json = tmp_path / "bench.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_memory.py"), "--preset", "tiny", "--batch", "1", "--seq", "64",
         "--response", "40", "--chunk-size", "16", "--device", "cpu", "--json", str(out_json),
         "--variants", "reference:1.0,fused:0.2"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["impl"], r["ratio"]) for r in rows] == [("reference", 1.0), ("fused", 0.2)]
    assert rows[0]["memory_ratio"] == 1.0 and rows[0]["time_ratio"] == 1.0
    assert all(r["step_s"] > 0 and r["extra_gib"] >= 0 and 0 <= r["score_select_share"] <= 1 for r in rows)
    assert rows[1]["selector"] == "soft_or" and rows[0]["selector"] == "all"
    assert "| fused | 20% |" in out.stdout and "| reference | 100% |" in out.stdout
