"""The teacher as one component: it scores the step's micro-batches and returns what the loss reads.

The loop knows one door, `Teacher.score(micro_batches) -> list[TeacherSide]` (phase 1 of the step, SPEC §1
and §7), plus the teacher's LM head and vocabulary size. What a side holds depends on the loss path:

    hidden  the teacher's final hidden states (N, d_T) at the response positions, after its last norm, in
            the teacher's dtype: the fused loss applies `Teacher.head` (V_T, d_T) to them chunk by chunk
            inside its kernel, so statistics, selection and divergence stay exact over the whole vocabulary
            while only N x d_T numbers are kept (or shipped, for a teacher on other machines);
    logits  the teacher's float32 logits (N, V_T) at the response positions (the reference loss path).

N counts the micro-batch's response positions in `positions()` order (logits at column j predict token
j + 1). Where the teacher lives is the implementation's business: `LocalTeacher` holds it in this process
(plain, ZeRO-3-sharded over the processes, or parked on the CPU between steps); `lm.served.RayTeacher` is a
pool of Ray actors on other processes or machines (teacher.placement: ray). Nothing in the loop or the step
knows which.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch

from lm.length_groups import states_at
from lm.models import gathered, head_weight, rows

Reads = Literal["hidden", "logits"]


class Scored(Protocol):
    """What a teacher needs of a micro-batch: rows of token ids (B, L), their attention mask (B, L), and
    `positions()` (B, L-1) bool, the columns whose next token is a response token. Several teachers
    (RoutedTeacher) also read `route_ids` (B,), each row's teacher, where the micro-batch has it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def positions(self) -> torch.Tensor: ...


@dataclass
class TeacherSide:
    """The teacher's side of one micro-batch: `values` is (N, d_T) hidden states or (N, V_T) float32 logits,
    as `kind` says."""

    kind: Reads
    values: torch.Tensor


class Teacher(Protocol):
    """What the training loop needs of a teacher, wherever it runs.

    reads   "hidden" (fused loss) or "logits" (reference loss): what `score` returns.
    head    (V_T, d_T) the teacher's LM head, a full copy on the trainer's device, multiplied by the fused
            kernel (None when the teacher returns logits).
    vocab   V_T, the teacher's vocabulary rows (padded embedding rows included).
    model   a local module the evaluation can sample from (the teacher's own score on the benchmarks), or
            None where the teacher is not in this process.

    names   () for one teacher; several teachers (RoutedTeacher): each one's name, as its metrics are named.

    `route(data_source)` is the index (into `names`) of the teacher that scores a rollout of that data source,
    carried by the micro-batch as `route_ids` (always 0 for one teacher).
    `score` sends all of a step's micro-batches at once and may return a lazy sequence: indexing side j waits
    for j only (a served teacher, lm.served), so the student's work on j starts as soon as j arrives.
    `take_metrics` returns the teacher's figures since the last call (see `take_metrics` below); `close`
    releases what the teacher holds outside the run (a served teacher's replicas) when the run ends.
    """

    reads: Reads
    head: torch.Tensor | None
    vocab: int
    model: torch.nn.Module | None
    names: tuple[str, ...]

    def route(self, data_source: str) -> int: ...

    def score(self, micro_batches: Sequence[Scored]) -> Sequence[TeacherSide]: ...

    def take_metrics(self) -> dict: ...

    def close(self) -> None: ...


def take_metrics(teacher) -> dict:
    """The step's teacher figures, then reset: `timing/teacher_wait_s`, the seconds the trainer spent waiting for
    sides (a local teacher: its whole forward; a served one: only what the student's work did not hide), and
    `teacher/payload_mb`, the MiB of sides the teacher returned to this process (what crosses the wire when it is
    served; the step's line sums it over the processes)."""
    metrics = {"timing/teacher_wait_s": teacher.waited, "teacher/payload_mb": teacher.received / 2**20}
    teacher.waited, teacher.received = 0.0, 0
    return metrics


def final_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                 group: bool = False, same_calls=None) -> torch.Tensor:
    """The teacher's final hidden states (after its last norm, in its dtype) at the response positions: (N, d_T);
    from forwards in length groups when `group` (lm.length_groups; `same_calls` under ZeRO-3)."""
    return states_at(model, input_ids, attention_mask, positions, group, same_calls)


class LocalTeacher:
    """A teacher held by this process: plain, ZeRO-3-sharded, or offloaded to the CPU between steps.

    model         the frozen HF causal LM (under ZeRO-3: its sharded module; `engine` keeps the sharding
                  hooks alive and every process must score the same number of micro-batches)
    reads         what `score` returns (see TeacherSide)
    device        where the forward runs (the trainer's device)
    cache_device  where the sides are kept until phase 2 reads them (the device, or the CPU to save memory)
    offload       park the backbone on the CPU outside `score` (a GPU whose memory the student needs);
                  the LM head stays on the device as its own copy
    group         forwards in length groups (lm.length_groups); for a ZeRO-3-sharded teacher only with
    same_calls    every process's number of forward calls from this one's (lm.length_groups.states)
    """

    def __init__(self, model, *, reads: Reads, device: torch.device, cache_device: torch.device,
                 offload: bool = False, engine=None, group: bool = False, same_calls=None):
        self.model, self.reads, self.device, self.cache_device = model, reads, device, cache_device
        self.engine, self.group = engine, group and (engine is None or same_calls is not None)
        self.same_calls = same_calls if engine is not None else None
        self.waited, self.received = 0.0, 0  # since the last take_metrics: seconds in score, bytes of sides
        self.offload = offload and engine is None and device.type == "cuda"
        weight = head_weight(model)
        self.vocab = rows(weight)
        self.head = self._own_head(weight) if reads == "hidden" else None

    def _own_head(self, weight: torch.Tensor) -> torch.Tensor:
        """The head the fused kernel multiplies: one full copy of a sharded head (not a gather per
        micro-batch), a copy that stays on the device when the backbone is offloaded, else the weight."""
        if self.engine is not None:
            with gathered(weight):
                return weight.detach().clone()
        if self.offload:
            return weight.detach().clone()
        return weight

    @torch.no_grad()
    def score(self, micro_batches: Sequence[Scored]) -> list[TeacherSide]:
        start = time.perf_counter()
        with self._on_device():
            sides = [TeacherSide(self.reads, self._side(mb)) for mb in micro_batches]
        self.waited += time.perf_counter() - start
        self.received += sum(side.values.nbytes for side in sides)
        return sides

    names = ()  # one teacher

    def route(self, data_source: str) -> int:
        return 0

    def take_metrics(self) -> dict:
        return take_metrics(self)

    def close(self) -> None:
        """Nothing to release: the model belongs to the run."""

    @contextlib.contextmanager
    def _on_device(self):
        if not self.offload:
            yield
            return
        self.model.to(self.device)
        try:
            yield
        finally:
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def _side(self, mb: Scored) -> torch.Tensor:
        states = final_states(self.model, mb.input_ids, mb.attention_mask, mb.positions(), self.group,
                              self.same_calls)
        if self.reads == "hidden":
            return states.to(self.cache_device)
        # Reference path: float32 products of the final hidden states and the head, autocast off, formed as
        # the fused kernel forms them, so both paths score from the same numbers.
        head = head_weight(self.model)
        with gathered(head), torch.autocast(device_type=states.device.type, enabled=False):
            return torch.nn.functional.linear(states.float(), head.float()).to(self.cache_device)


# ----------------------------------------------------------------------------
# several teachers, one per data source (teacher.routes)


@dataclass
class Rows:
    """Some rows of a micro-batch, as a teacher scores them (the Scored protocol)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor  # (B', L-1) the rows' response positions

    def positions(self) -> torch.Tensor:
        return self.mask


@dataclass
class SidePart:
    """The rows of a micro-batch one teacher scored: `index` (N_p,) their places among the micro-batch's N
    response positions (None: all of them), `values` (N_p, d_T) that teacher's hidden states, `head` its LM head
    (V, d_T) cut to the vocabulary every teacher shares."""

    index: torch.Tensor | None
    values: torch.Tensor
    head: torch.Tensor


@dataclass
class RoutedSide:
    """A micro-batch's teacher side when several teachers scored its rows (fused loss: hidden states)."""

    kind: Reads
    parts: list[SidePart]


@dataclass
class Plan:
    """Where micro-batch j's rows went: per teacher scoring some of them, (teacher, index, place in the list that
    teacher scored); `tokens` = N."""

    parts: list[tuple[int, torch.Tensor | None, int]]
    tokens: int


class RoutedTeacher:
    """The Teacher protocol over several teachers, each scoring the rollouts of its data sources (teacher.routes).

    teachers  name -> Teacher (local or served; the same `reads`): `default` is the teacher: section's own, the
              others are named by their data source
    Micro-batches carry `route_ids` (B,), the index into `teachers` of each row's teacher (`route` gives it from
    a data source). A micro-batch's rows are split by teacher; each teacher is sent all of a step's rows it scores
    at once (a served one scores them while the student works); the sides come back in position order: float32
    logits reassembled into one (N, V) tensor (reference loss), or a RoutedSide whose parts the fused kernel reads
    with their own teacher's head. Every teacher's vocabulary is cut to the smallest one (V = min V_T; the
    tokenizer they share has fewer tokens), so every row's statistics compare the same columns.
    """

    head = None  # each part of a side carries its own teacher's head

    def __init__(self, teachers: dict[str, "Teacher"], default: str):
        self.names, self.teachers = tuple(teachers), list(teachers.values())
        reads = {t.reads for t in self.teachers}
        if len(reads) != 1:
            raise ValueError(f"the routed teachers return different sides ({', '.join(sorted(reads))})")
        self.reads = reads.pop()
        self.vocab = min(t.vocab for t in self.teachers)
        self.heads = [None if t.head is None else t.head[:self.vocab] for t in self.teachers]
        self.default = self.names.index(default) if default in self.names else None
        self.model = self.teachers[self.default].model if self.default is not None else None

    def route(self, data_source: str) -> int:
        """The index of the teacher of a data source: its route's, else the default teacher's."""
        if data_source in self.names:
            return self.names.index(data_source)
        if self.default is None:
            raise KeyError(f"data source {data_source!r} has no route and no default teacher was loaded")
        return self.default

    def score(self, micro_batches: Sequence[Scored]) -> "RoutedSides":
        plans, work = [], [[] for _ in self.teachers]
        for mb in micro_batches:
            pos = mb.positions()
            ids = getattr(mb, "route_ids", None)
            ids = ids.cpu() if ids is not None else torch.full(pos.shape[:1], self.default or 0)
            token_route = ids.to(pos.device)[:, None].expand_as(pos)[pos]
            parts = []
            for r in sorted(set(ids.tolist())):
                rows = (ids == r).to(pos.device)
                whole = bool(rows.all())
                sub = mb if whole else Rows(mb.input_ids[rows], mb.attention_mask[rows], pos[rows])
                parts.append((r, None if whole else (token_route == r).nonzero().squeeze(1), len(work[r])))
                work[r].append(sub)
            plans.append(Plan(parts, int(pos.sum())))
        sides = [t.score(w) if w else [] for t, w in zip(self.teachers, work)]
        return RoutedSides(self, plans, sides)

    def take_metrics(self) -> dict:
        """The sums over the teachers (under one teacher's keys), each teacher's payload as teacher/<name>/payload_mb
        and its wait as timing/teacher_wait_s/<name>."""
        out = {"timing/teacher_wait_s": 0.0, "teacher/payload_mb": 0.0}
        for name, teacher in zip(self.names, self.teachers):
            mine = teacher.take_metrics()
            out["timing/teacher_wait_s"] += mine["timing/teacher_wait_s"]
            out["teacher/payload_mb"] += mine["teacher/payload_mb"]
            out[f"timing/teacher_wait_s/{name}"] = mine["timing/teacher_wait_s"]
            out[f"teacher/{name}/payload_mb"] = mine["teacher/payload_mb"]
        return out

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # every teacher closed, whichever raises
            for teacher in self.teachers:
                stack.callback(teacher.close)


class RoutedSides(Sequence):
    """A step's routed sides: indexing j waits for the teachers of micro-batch j only."""

    def __init__(self, routed: RoutedTeacher, plans: list[Plan], sides: list[Sequence[TeacherSide]]):
        self.routed, self.plans, self.sides = routed, plans, sides

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, j: int):
        plan, routed = self.plans[j], self.routed
        got = [(index, self.sides[r][k].values, r) for r, index, k in plan.parts]
        if routed.reads == "hidden":
            return RoutedSide("hidden", [SidePart(index, values, routed.heads[r]) for index, values, r in got])
        if len(got) == 1 and got[0][0] is None:
            return TeacherSide("logits", got[0][1][:, :routed.vocab])
        first = got[0][1]
        logits = torch.empty(plan.tokens, routed.vocab, dtype=first.dtype, device=first.device)
        for index, values, _ in got:
            logits[index.to(first.device) if index is not None else slice(None)] = values[:, :routed.vocab]
        return TeacherSide("logits", logits)
