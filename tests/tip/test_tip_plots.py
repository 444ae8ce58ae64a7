"""The picture command on a small fabricated run directory."""

import json
import subprocess
import sys
from pathlib import Path

import torch

import tip
from conftest import select, tip_denominator
from tip import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


def fabricate_run(run_dir: Path, steps=4, tokens=True, metrics=True) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        n = 200
        h = torch.rand(n, generator=g) ** 2
        d = torch.rand(n, generator=g) ** 4 * 3
        stats = tip.TokenStats(h, d, d * 1.1, h / 3, torch.arange(n) // 50)
        selection = select("soft_or", stats, 0.3)
        if tokens:
            quad = tip.quadrants(stats)
            ids = torch.randint(0, 26, (n,), generator=g)
            tip.write_jsonl(run_dir / "tokens.jsonl", tip.token_records(stats, selection, quad, ids, lambda i: chr(97 + i), n=80, generator=g, step=step))
        if metrics:
            line = {"step": step, "opd/loss": 1.0 / step, **tip.diagnostics(stats, selection)}
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
                f.write(json.dumps({"step": step, "val/demo/mean@4": 0.5}) + "\n")  # lines without tip/ keys are skipped


def test_render_writes_both_pngs(tmp_path):
    fabricate_run(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "tip/q1_sh')  # a torn last line from a killed run
    paths = plots.render(tmp_path)
    assert [p.name for p in paths] == ["hd_plane.png", "quadrant_shares.png"]
    for p in paths:
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000


def test_render_with_only_metrics_draws_the_shares(tmp_path, capsys):
    fabricate_run(tmp_path, tokens=False)
    paths = plots.render(tmp_path)
    assert [p.name for p in paths] == ["quadrant_shares.png"]
    assert "skipping hd_plane.png" in capsys.readouterr().err


def test_missing_inputs_exit_2_with_one_line(tmp_path, capsys):
    assert plots.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "run directory not found" in err and "\n" not in err
    assert plots.main([str(tmp_path)]) == 2
    assert "neither tokens.jsonl nor metrics.jsonl" in capsys.readouterr().err


def test_module_command_runs(tmp_path):
    fabricate_run(tmp_path, steps=2)
    ok = subprocess.run([sys.executable, "-m", "tip.plots", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "plots" / "hd_plane.png").is_file()
    missing = subprocess.run([sys.executable, "-m", "tip.plots", str(tmp_path / "absent")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
