"""A teacher served by a pool of Ray actors (teacher.placement: ray), on its own GPUs or machines.

Each replica is a Ray actor holding the whole teacher. The trainer sends every micro-batch of a step as soon as
the rollouts exist (token ids, attention mask, response positions) and gets back the teacher's final hidden
states (N, d_T) in the teacher's dtype; it keeps one copy of the teacher's LM head, fetched once at start, which
the fused kernel multiplies chunk by chunk. The statistics, the selection and the loss are therefore the same
numbers as with the teacher in the process, over the whole vocabulary, while only N x d_T numbers cross the
wire (for Qwen3-8B: d_T 4,096 against V_T 151,936 logits per token).

What runs where (docs/scale_out.md): the trainer processes (accelerate, any number) each send their own
micro-batches, spread round-robin over the replicas; process 0 starts the replicas (and, with no
`teacher.ray.address`, a local Ray instance whose address it shares with the other processes). At start every
replica reports a hash of its weights: replicas that disagree are refused, as is a replica whose teacher differs
from the one the run directory recorded at its first start.

Faults: a micro-batch not back within `timeout_s` kills its replica (Ray restarts it, `max_restarts` times);
a replica that dies or is killed has its micro-batch moved to the next replica still in service. A replica that
failed more than `max_restarts` times is out of service; with none left, `TeacherUnavailable` names the replica
and what happened (the trainer adds the last good checkpoint and stops; a rerun resumes from it).

Ray is optional: it is imported only here, when a served teacher is built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

from lm.config import ModelConfig, RayTeacherConfig
from lm.models import head_weight, load_model, resolve_dtype, rows
from lm.teacher import Scored, TeacherSide, final_states, take_metrics
from lm.tokenizers import load_tokenizer

MISSING = "teacher.placement: ray needs the ray package, which is not installed (pip install -r requirements-ray.txt)"
PACKAGE_DIR = Path(__file__).resolve().parent  # shipped to the replicas (Ray runtime_env py_modules)
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # Ray's token authentication (Ray >= 2.5x)


class TeacherUnavailable(RuntimeError):
    """No replica is left to score a micro-batch (or the replicas refuse to start)."""


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def check_placement(placement: str, key: str = "teacher") -> list[str]:
    """`key`.placement=ray needs Ray importable here: said at --check, before anything loads."""
    return [MISSING.replace("teacher.", f"{key}.", 1)] if placement == "ray" and not ray_available() else []


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (name, dtype, shape, bytes): two replicas hold the same teacher
    exactly when their fingerprints agree. Reads every weight once (seconds per GB)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class TeacherReplica:
    """The body of one replica actor: loads the teacher (on its GPU if Ray gave it one) and scores micro-batches."""

    def __init__(self, mc: ModelConfig, threads: int, group: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if torch.cuda.device_count() > 1 and mc.path and not mc.gguf_file:
            self.model = spread(mc)  # a teacher larger than one GPU: its layers over the replica's GPUs
            self.device = self.model.get_input_embeddings().weight.device
        else:
            self.model = load_model(mc, load_tokenizer(mc), self.device, trainable=False)
        self.group = group  # forwards in length groups (lm.length_groups)

    def describe(self) -> dict:
        head = head_weight(self.model)
        return {"fingerprint": fingerprint(self.model), "vocab": rows(head), "dtype": str(head.dtype),
                "host": socket.gethostname(), "pid": os.getpid(), "device": str(self.device)}

    def ready(self) -> bool:
        return True

    def head(self) -> torch.Tensor:
        return head_weight(self.model).detach().to("cpu").clone()

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        on = self.device
        return final_states(self.model, input_ids.to(on), attention_mask.to(on), positions.to(on),
                            self.group).to("cpu")


def spread(mc: ModelConfig) -> torch.nn.Module:
    """The teacher's layers spread over every GPU Ray gave the replica (transformers' device_map="auto"); the
    final hidden states come out on the last one. Written for multi-GPU replicas; not run here (no GPU)."""
    model = AutoModelForCausalLM.from_pretrained(mc.path, dtype=resolve_dtype(mc.dtype, torch.device("cuda")),
                                                 attn_implementation=mc.attn_implementation, device_map="auto",
                                                 trust_remote_code=mc.trust_remote_code)
    return model.eval().requires_grad_(False)


@dataclass
class Job:
    """One micro-batch in flight: what was sent (kept to send it again), to which replica, and its result."""

    args: tuple
    replica: int
    ref: object
    moves: int = 0


class PendingSides(Sequence):
    """A step's sides as they arrive: indexing j waits for micro-batch j only (and caches it)."""

    def __init__(self, teacher: "RayTeacher", jobs: list[Job]):
        self.teacher, self.jobs, self.done = teacher, jobs, {}

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, j: int) -> TeacherSide:
        if j not in self.done:
            self.done[j] = TeacherSide("hidden", self.teacher.result(self.jobs[j]))
        return self.done[j]


class RayTeacher:
    """The Teacher protocol (lm.teacher) over a pool of replica actors; `reads` is always "hidden".

    share(obj)  process 0's `obj` on every trainer process (a broadcast; identity for one process): the Ray
                address and the pool's namespace are decided once, by process 0.
    recorded    the weights hash the run directory recorded at its first start (None: a new run)
    key         the config section of this teacher (`teacher`, or `teacher.routes.<source>`), for messages
    group       replicas run forwards in length groups (lm.length_groups; opd.length_groups)
    """

    reads = "hidden"
    model = None

    def __init__(self, mc: ModelConfig, rc: RayTeacherConfig, device: torch.device, *, process_index: int = 0,
                 num_processes: int = 1, share: Callable = lambda obj: obj, recorded: str | None = None,
                 log: Callable = print, key: str = "teacher", group: bool = False):
        self.rc, self.device, self.log, self.key, self.group = rc, device, log, key, group
        self.label = "teacher" if key == "teacher" else f"teacher `{key.removeprefix('teacher.routes.')}`"
        self.waited, self.received = 0.0, 0
        self.failures = [0] * rc.num_replicas  # incidents per replica (death or time-out)
        self.serving, self.restarting = set(range(rc.num_replicas)), set()
        self.next = process_index  # round-robin start: the processes' first micro-batches go to different replicas
        self.stride = num_processes
        address, namespace, auth = share(self._start(mc) if process_index == 0 else None)
        if process_index != 0:
            self._connect(address, namespace, auth)
        share(None)  # every process waits here until process 0 has started the pool
        ray = self.ray
        self.actors = [ray.get_actor(f"teacher-{i}", namespace=namespace) for i in range(rc.num_replicas)]
        self.replicas = self._check(recorded)
        self.fingerprint = self.replicas[0]["fingerprint"]
        head = ray.get(self.actors[0].head.remote(), timeout=rc.start_timeout_s)
        self.head, self.vocab = head.to(device), rows(head)

    # -- start ---------------------------------------------------------------------------------------------

    def _start(self, mc: ModelConfig) -> tuple[str, str, dict]:
        """Process 0: attach to the cluster (or start a local one), start the replicas; (address, namespace, the
        Ray authentication settings the other processes need to connect)."""
        import ray  # optional dependency: only a served teacher needs it

        self.ray, rc = ray, self.rc
        namespace = f"tip-teacher-{uuid.uuid4().hex[:12]}"
        runtime_env = {"py_modules": [str(PACKAGE_DIR)]}
        if ray.is_initialized():  # already connected (an earlier run in this process, a notebook): its workers
            pass                  # must be able to import `lm` (ray.init(runtime_env={"py_modules": [...]}))
        elif rc.address:
            ray.init(address=rc.address, runtime_env=runtime_env, log_to_driver=False)
        else:
            needed = int(rc.num_replicas * rc.num_cpus + 0.999)
            ray.init(runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                     num_cpus=max(os.cpu_count() or 1, needed))
        replica = ray.remote(TeacherReplica)
        threads = max(1, round(rc.num_cpus)) if rc.num_gpus == 0 else 0
        self.owned = [replica.options(name=f"teacher-{i}", namespace=namespace, num_cpus=rc.num_cpus,
                                      num_gpus=rc.num_gpus, max_restarts=rc.max_restarts,
                                      max_task_retries=0).remote(mc, threads, self.group)
                      for i in range(rc.num_replicas)]
        auth = {k: v for k, v in os.environ.items() if k in AUTH_ENV}  # what Ray set up for its token auth
        return ray.get_runtime_context().gcs_address, namespace, auth

    def _connect(self, address: str, namespace: str, auth: dict) -> None:
        """The other trainer processes: the same cluster, with process 0's authentication settings."""
        os.environ.update(auth)  # before Ray is imported: it reads them once
        import ray  # optional dependency: only a served teacher needs it

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)

    def close(self) -> None:
        """Stop the replicas this process started (the Ray instance itself ends with the process)."""
        for actor in getattr(self, "owned", []):
            self.ray.kill(actor)
        self.owned = []

    def _check(self, recorded: str | None) -> list[dict]:
        """Every replica's description; replicas holding a different teacher are refused."""
        try:
            described = self.ray.get([a.describe.remote() for a in self.actors], timeout=self.rc.start_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise TeacherUnavailable(f"the {self.label} replicas did not start within {self.key}.ray.start_timeout_s="
                                     f"{self.rc.start_timeout_s:g}s") from None
        except self.ray.exceptions.RayError as exc:
            raise TeacherUnavailable(f"a {self.label} replica failed to start: {last_line(exc)}") from None
        first = described[0]
        for i, d in enumerate(described):
            if d["fingerprint"] != first["fingerprint"]:
                raise TeacherUnavailable(f"{self.label} replica {i} ({where(d)}) holds a different teacher than replica 0 "
                                         f"(weights sha256 {d['fingerprint'][:12]} vs {first['fingerprint'][:12]})")
        if recorded and first["fingerprint"] != recorded:
            raise TeacherUnavailable(f"the {self.label} replicas hold a different teacher than this run started with "
                                     f"(weights sha256 {first['fingerprint'][:12]} vs {recorded[:12]} in teacher.json)")
        for i, d in enumerate(described):
            self.log(f"{self.label} replica {i}: {where(d)}, {d['device']}, {d['dtype']}, weights sha256 "
                     f"{d['fingerprint'][:12]}")
        return described

    # -- scoring -------------------------------------------------------------------------------------------

    def score(self, micro_batches: Sequence[Scored]) -> PendingSides:
        """Send every micro-batch now; the sides arrive while the student works on the earlier ones."""
        jobs = []
        for mb in micro_batches:
            args = (mb.input_ids.to("cpu"), mb.attention_mask.to("cpu"), mb.positions().to("cpu"))
            replica = self._pick(avoid=None)
            if replica is None:
                raise TeacherUnavailable(f"no {self.label} replica is left ({self.key}.ray.max_restarts="
                                         f"{self.rc.max_restarts} per replica)")
            jobs.append(Job(args, replica, self.actors[replica].score.remote(*args)))
        return PendingSides(self, jobs)

    def result(self, job: Job) -> torch.Tensor:
        """Job's hidden states on the trainer's device; a failed replica's micro-batch moves to another one."""
        start = time.perf_counter()
        try:
            while True:
                try:
                    values = self.ray.get(job.ref, timeout=self.rc.timeout_s)
                    break
                except self.ray.exceptions.GetTimeoutError:
                    why = f"did not answer within {self.key}.ray.timeout_s={self.rc.timeout_s:g}s"
                    self.ray.kill(self.actors[job.replica], no_restart=False)  # Ray restarts it if it may
                except self.ray.exceptions.ActorDiedError:
                    why = "died"
                except self.ray.exceptions.RayActorError:
                    why = "became unreachable (its process died, or Ray is restarting it)"
                except self.ray.exceptions.RayTaskError as exc:
                    raise TeacherUnavailable(f"{self.label} replica {job.replica} failed to score a micro-batch: "
                                             f"{last_line(exc)}") from None
                self._move(job, why)
        finally:
            self.waited += time.perf_counter() - start
        self.received += values.nbytes
        return values.to(self.device, non_blocking=True)

    def _move(self, job: Job, why: str) -> None:
        failed = job.replica
        if failed in self.serving:  # one failure per incident: errors while it restarts do not count again
            self.serving.discard(failed)
            self.failures[failed] += 1
            if self.failures[failed] > self.rc.max_restarts:
                self.ray.kill(self.actors[failed], no_restart=True)
            else:
                self.restarting.add(failed)
        job.moves += 1
        replica = self._pick(avoid=failed) if job.moves <= self.rc.num_replicas * (self.rc.max_restarts + 2) else None
        if replica is None:
            raise TeacherUnavailable(f"{self.label} replica {failed} ({where(self.replicas[failed])}) {why}, and no "
                                     f"replica is left ({self.key}.ray.max_restarts={self.rc.max_restarts} per replica)")
        self.log(f"{self.label} replica {failed} {why}: its micro-batch moves to replica {replica}")
        job.replica, job.ref = replica, self.actors[replica].score.remote(*job.args)

    def _pick(self, avoid: int | None) -> int | None:
        """The next replica in service, round-robin (`avoid`, the one that just failed, only if it is the only
        one); with none in service, the first restarted one (waiting up to start_timeout_s); None: none left."""
        self._poll(wait=False)
        if not self.serving:
            self._poll(wait=True)
        n = self.rc.num_replicas
        order = [(self.next + k) % n for k in range(n)]
        self.next = (self.next + self.stride) % n
        for r in order:
            if r in self.serving and r != avoid:
                return r
        return avoid if avoid in self.serving else None

    def _poll(self, wait: bool) -> None:
        """Back in service: restarting replicas that answer a ping (Ray refuses calls while an actor restarts)."""
        deadline = time.monotonic() + (self.rc.start_timeout_s if wait else 0.0)
        while self.restarting:
            for r in sorted(self.restarting):
                try:
                    self.ray.get(self.actors[r].ready.remote(), timeout=max(0.0, deadline - time.monotonic()))
                except self.ray.exceptions.ActorDiedError:  # out of Ray's restarts
                    self.restarting.discard(r)
                    continue
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError):
                    continue
                self.restarting.discard(r)
                self.serving.add(r)
            if self.serving or not wait or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    names = ()  # one teacher

    def route(self, data_source: str) -> int:
        return 0

    def take_metrics(self) -> dict:
        return take_metrics(self)


def where(d: dict) -> str:
    return f"pid {d['pid']} on {d['host']}"


def last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
