"""scripts/bench_length_groups.py on a tiny random pair: it runs and its table says what it measured (a smoke test of
the script, not a timing)."""

import subprocess
import sys

from conftest import REPO, tiny_chat_pair

SCRIPT = REPO / "scripts" / "bench_length_groups.py"


def test_the_script_times_both_layouts_on_a_pair(tmp_path):
    tiny_chat_pair(tmp_path)
    out = subprocess.run([sys.executable, str(SCRIPT), "--pair", str(tmp_path), "--responses", "40,3,5,40,2,4",
                          "--repeats", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    head = out.stdout.splitlines()[0]
    assert head.startswith("6 rows, responses [40, 3, 5, 40, 2, 4]; padded ") and "in 2 group(s)" in head, head
    padded, grouped = (int(head.split(" slots")[i].split()[-1]) for i in (0, 1))
    assert grouped < padded
    rows = [line for line in out.stdout.splitlines() if line.startswith("| padded") or line.startswith("| length")]
    assert len(rows) == 2 and all(float(line.split("|")[2]) > 0 for line in rows)


def test_bad_lengths_are_one_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "--responses", "4,x"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 2 and "is not a comma list of integers" in out.stderr
