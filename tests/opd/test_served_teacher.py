"""A teacher served by Ray actors (teacher.placement: ray, lm/served.py) trains exactly what the local teacher trains.

The replicas return final hidden states; the trainer applies its copy of the teacher's LM head in the fused
kernel. On CPU in float32 a served run must log the same metrics, dump the same tokens and end with the same
weights as the local run of the same config, with one replica or two. Faults are real: a replica's process is
killed (SIGKILL) or frozen (SIGSTOP) by its pid.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_metrics, run_cli, tiny_config, write_config

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -r requirements-ray.txt)")

from lm.served import RayTeacher, TeacherUnavailable  # noqa: E402
from opd.config import load_config  # noqa: E402
from opd.errors import RunError  # noqa: E402
from opd.trainer import train  # noqa: E402

VOLATILE = ("timing/", "perf/")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    yield
    ray.shutdown()  # the local Ray instance the runs started, before other test modules run


def config(tmp_path: Path, name: str, served: dict | None, **sections) -> Path:
    d = tiny_config(tmp_path, **{"tip": {"dump_tokens": 20, **sections.pop("tip", {})}, **sections})
    d["train"]["run_name"] = name
    if served is not None:
        d["teacher"].update({"placement": "ray", "ray": served})
    return write_config(tmp_path / f"{name}.yaml", d)


def run(tmp_path: Path, name: str, served: dict | None, **sections) -> Path:
    return train(load_config([str(config(tmp_path, name, served, **sections))]))


def stable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in read_metrics(run_dir)]


def assert_same_run(got: Path, want: Path) -> None:
    assert stable(got) == stable(want)
    assert (got / "tokens.jsonl").read_text() == (want / "tokens.jsonl").read_text()
    last = sorted(p.name for p in (want / "checkpoints").iterdir())[-1]
    a = load_file(str(got / "checkpoints" / last / "model.safetensors"))
    b = load_file(str(want / "checkpoints" / last / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"final weights differ by up to {worst:.3g}"


@pytest.mark.parametrize("selector,replicas", [
    ("soft_or", 1), ("all", 2),
    pytest.param("soft_or", 2, marks=pytest.mark.slow), pytest.param("all", 1, marks=pytest.mark.slow)])
def test_served_teacher_trains_what_the_local_teacher_trains(tmp_path, selector, replicas):
    tip = {"selector": selector, "ratio": 0.5}
    local = run(tmp_path, "local", None, tip=tip)
    served = run(tmp_path, "served", {"num_replicas": replicas}, tip=tip)
    assert_same_run(served, local)
    metrics = read_metrics(served)
    # 4 tokens x d=32 float32 = 512 bytes per response token came back, and nothing else
    assert all(m["teacher/payload_mb"] * 2**20 == 32 * 4 * m["opd/num_tokens"] for m in metrics)
    assert all(m["timing/teacher_wait_s"] >= 0 for m in metrics)
    record = json.loads((served / "teacher.json").read_text())
    assert len(record["replicas"]) == replicas and len(record["fingerprint"]) == 64


def test_last_replica_dying_stops_the_run_in_one_line_and_a_rerun_resumes(tmp_path, monkeypatch):
    served = {"num_replicas": 1, "max_restarts": 0}
    calls = []
    real_score = RayTeacher.score

    def score_then_die(self, micro_batches):
        calls.append(1)
        if len(calls) == 2:  # step 2: the only replica's process is killed before it scores
            kill(self.replicas[0]["pid"], signal.SIGKILL)
        return real_score(self, micro_batches)

    monkeypatch.setattr(RayTeacher, "score", score_then_die)
    with pytest.raises(RunError) as info:
        run(tmp_path, "served", served, train={"save_every": 1})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("stopped: teacher replica 0 (pid ") and "no replica is left" in message
    assert message.endswith("(last good checkpoint: step_000001)") or "step_000001" in message, message
    monkeypatch.undo()
    resumed = run(tmp_path, "served", served, train={"save_every": 1})
    local = run(tmp_path, "local", None, train={"save_every": 1})
    assert_same_run(resumed, local)


@pytest.mark.slow
def test_a_dead_or_frozen_replica_has_its_micro_batch_moved(tmp_path):
    from lm.config import ModelConfig, RayTeacherConfig
    from lm.models import load_model
    from lm.teacher import LocalTeacher
    from lm.tokenizers import char_tokenizer
    from opd.step import MicroBatch

    mc = ModelConfig(arch="qwen3", hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
                     tokenizer="chars")
    cpu, lines = torch.device("cpu"), []
    teacher = RayTeacher(mc, RayTeacherConfig(num_replicas=2, timeout_s=5, max_restarts=1), cpu, log=lines.append)
    local = LocalTeacher(load_model(mc, char_tokenizer(), cpu, trainable=False), reads="hidden", device=cpu,
                         cache_device=cpu)
    batches = []
    for seed in range(4):
        ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(seed))
        response = torch.zeros_like(ids)
        response[:, 6:] = 1
        batches.append(MicroBatch(ids, torch.ones_like(ids), response, torch.ones(2), torch.arange(2)))
    want = [side.values for side in local.score(batches)]
    try:
        kill(teacher.replicas[0]["pid"], signal.SIGKILL)  # dies
        sides = teacher.score(batches)
        assert all(torch.equal(sides[j].values, want[j]) for j in range(4))
        assert teacher.failures == [1, 0] and any("replica 0 became unreachable" in line for line in lines)
        os.kill(teacher.replicas[1]["pid"], signal.SIGSTOP)  # hangs: timed out, killed, restarted by Ray
        sides = teacher.score(batches)
        assert all(torch.equal(sides[j].values, want[j]) for j in range(4))
        assert teacher.failures[1] == 1 and any("did not answer within teacher.ray.timeout_s=5s" in line
                                                for line in lines)
    finally:
        teacher.close()


def test_replicas_holding_another_teacher_than_the_run_started_with_are_refused(tmp_path):
    first = run(tmp_path, "served", {"num_replicas": 1}, train={"steps": 2, "save_every": 1})
    record = json.loads((first / "teacher.json").read_text())
    record["fingerprint"] = "0" * 64  # the teacher's files were replaced between two parts of the run
    (first / "teacher.json").write_text(json.dumps(record))
    with pytest.raises(RunError, match=r"different teacher than this run started with .*0000000000"):
        run(tmp_path, "served", {"num_replicas": 1}, train={"steps": 3, "save_every": 1})
    assert [m["step"] for m in read_metrics(first)] == [1, 2]  # nothing written was changed


def test_a_served_teacher_is_checked_before_anything_loads(tmp_path, monkeypatch):
    path = config(tmp_path, "served", {"num_replicas": 1})
    out = run_cli(["--config", str(path), "opd.loss_impl=reference", "--check"])
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "opd.loss_impl: a served teacher (teacher.placement: ray) returns hidden states" in out.stderr
    out = run_cli(["--config", str(path), "eval.teacher=true", "--check"])
    assert out.returncode == 2 and "eval.teacher: evaluating the teacher needs it in this process" in out.stderr

    import lm.served
    from opd.preflight import preflight

    monkeypatch.setattr(lm.served, "ray_available", lambda: False)
    problems = preflight(load_config([str(path)]))
    assert problems == ["teacher.placement: ray needs the ray package, which is not installed "
                        "(pip install -r requirements-ray.txt)"]


def kill(pid: int, sig: int) -> None:
    os.kill(pid, sig)
    deadline = time.monotonic() + 30
    while sig == signal.SIGKILL and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # gone (or a zombie Ray has not reaped yet: its socket is closed either way)
        if Path(f"/proc/{pid}/status").exists() and "zombie" in Path(f"/proc/{pid}/status").read_text():
            break


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_two_trainer_processes_each_send_their_share(tmp_path, replicas):
    """accelerate (DDP on CPU, two processes) with a served teacher trains what one process with a local teacher
    trains, within fp32 reduction-order noise (the tolerances of tests/distributed)."""
    import math
    import socket
    import subprocess
    import sys

    from conftest import REPO

    tip = {"selector": "soft_or", "ratio": 0.5}
    local = run(tmp_path, "local", None, tip=tip, rollout={"max_new_tokens": 24}, train={"save_every": 0})
    path = config(tmp_path, "served", {"num_replicas": replicas}, tip=tip, rollout={"max_new_tokens": 24},
                  train={"save_every": 0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                          "--main_process_port", str(port), str(REPO / "train.py"), "--config", str(path)],
                         capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-4000:]
    served = path.parent / "runs" / "served"
    got, want = stable(served), stable(local)
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        off = {k: (g[k], w[k]) for k in w if not math.isclose(g[k], w[k], rel_tol=1e-4, abs_tol=1e-6)}
        assert not off, f"step {w['step']}: (served on two processes, local on one) {off}"
    name = "checkpoints/step_000003/model.safetensors"
    a, b = load_file(str(served / name)), load_file(str(local / name))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.slow
def test_an_agentic_run_with_a_served_teacher_trains_what_the_local_one_trains(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "agent"))
    from test_agent_train import agent_config

    def agentic(name: str, teacher: dict) -> Path:
        path = agent_config(tmp_path, train={"run_name": name}, teacher=teacher)  # merged into the tiny teacher
        return train(load_config([str(path)]))

    local = agentic("local", {})
    served = agentic("served", {"placement": "ray", "ray": {"num_replicas": 2}})
    assert_same_run(served, local)


@pytest.mark.slow
def test_a_served_route_trains_what_the_same_route_trains_locally(tmp_path):
    """teacher.routes: one data source's teacher served by Ray, the other rollouts' teacher local."""
    from test_routes import OTHER, routed_config

    local = train(load_config([str(routed_config(tmp_path, "local", {"sub": OTHER}))]))
    served = {"sub": {**OTHER, "placement": "ray", "ray": {"num_replicas": 2}}}
    run_dir = train(load_config([str(routed_config(tmp_path, "served", served))]))
    assert stable(run_dir) == stable(local)
    record = [json.loads(p.read_text()) for p in run_dir.glob("teacher-*.json")]
    assert len(record) == 1 and record[0]["config_key"] == "teacher.routes.sub" and len(record[0]["replicas"]) == 2
    assert not (run_dir / "teacher.json").exists()  # the default teacher is local
