"""Cache-affinity scheduling of one MoE layer's expert tasks (ZipMoE §4).

Pure Python, no I/O: the engine builds one :class:`Task` per selected expert that is not tier F
(:func:`tasks_from_tiers`), orders them with :func:`schedule` and runs the blocks on one I/O thread
and ``L`` decode workers; :func:`simulate` replays that execution with given costs.

Model (design note ``ZIPMOE.md`` §2, §4): a task first reads what the cache lacks on the single
I/O thread (``io_s``: the sign+mantissa planes for tiers E and miss, the compressed exponent for
S and miss, nothing for C), then decodes (``compute_s``) on one of ``L`` identical workers.
Type-I tasks must read SM from flash (E, miss: I/O-heavy); Type-II tasks have SM resident
(S, C: CPU-heavy).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from numbers import Integral

from .planner import DelayModel

__all__ = [
    "Task",
    "Block",
    "TaskTimes",
    "schedule",
    "execution_order",
    "simulate",
    "simulate_order",
    "makespan_lower_bound",
    "tasks_from_tiers",
]


@dataclass(frozen=True)
class Task:
    """One expert's preparation in one MoE layer (§4).

    Attributes:
        expert: expert id (unique within a layer's task list).
        kind: ``"I"`` (SM read from flash needed: tier E or miss) or ``"II"`` (SM resident:
            tier S or C). F-tier experts need no task.
        work: estimated work, the tokens routed to the expert (heap key, ``>= 0``).
        io_s: seconds this task occupies the I/O thread (SM and/or exponent reads; 0 for C).
        compute_s: seconds of decode (decompress + merge) on one worker.

    Raises:
        ValueError: unknown kind, negative or non-finite numbers, non-integer expert.
    """

    expert: int
    kind: str
    work: float
    io_s: float
    compute_s: float

    def __post_init__(self):
        if isinstance(self.expert, bool) or not isinstance(self.expert, Integral):
            raise ValueError(f"expert must be an integer, got {self.expert!r}")
        if self.kind not in ("I", "II"):
            raise ValueError(f"kind must be 'I' or 'II', got {self.kind!r}")
        for name in ("work", "io_s", "compute_s"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")


@dataclass(frozen=True)
class Block:
    """A group of tasks formed by :func:`schedule` (§4).

    Attributes:
        opener: the Type-I task that opened the block (None for the final block of leftover
            Type-II tasks).
        tasks: the block's tasks: the opener (if any) then the Type-II tasks in the order added.
        est_io_s: estimated I/O of the block = ``Σ io_s`` over all its tasks (time the block keeps
            the single I/O thread busy: the opener's read plus the Type-II tasks' exponent reads).
        est_compute_s: estimated compute of the block = ``Σ compute_s / L`` over its Type-II tasks
            (the time ``L`` workers need to decode them, i.e. the decode work available to overlap
            the opener's read; the opener's own decode cannot overlap its own read, so it is not
            counted here: it overlaps the next block).
    """

    opener: Task | None
    tasks: tuple
    est_io_s: float
    est_compute_s: float


@dataclass(frozen=True)
class TaskTimes:
    """When one task ran in :func:`simulate` (seconds from the layer's start).

    ``read_start == read_end == 0`` for tasks without I/O (ready at once).
    """

    expert: int
    kind: str
    read_start: float
    read_end: float
    decode_start: float
    decode_end: float
    worker: int


def _check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, Integral) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return int(workers)


def _check_tasks(tasks) -> list[Task]:
    tasks = list(tasks)
    for t in tasks:
        if not isinstance(t, Task):
            raise ValueError(f"expected Task, got {type(t).__name__}")
    ids = [t.expert for t in tasks]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate experts in tasks: {sorted(ids)}")
    return tasks


def schedule(tasks, workers) -> list[Block]:
    """Cache-affinity blocks of one layer's tasks (design note §4).

    Two max-heaps, Type-I and Type-II, keyed by ``work`` (ties: smaller expert id first). While
    Type-I tasks remain: pop one, opening a block (its SM read occupies the I/O thread); then pop
    Type-II tasks into the block while ``est_compute_s <= est_io_s`` (definitions in
    :class:`Block`; both are updated as each task joins), i.e. until the block's estimated compute
    exceeds its estimated I/O or no Type-II task is left. Then one last block (``opener=None``)
    drains any Type-II tasks left. Deterministic.

    Args:
        tasks: iterable of :class:`Task` with distinct experts.
        workers: L, the decode workers, ``>= 1``.

    Returns:
        list of :class:`Block` in execution order; every task appears in exactly one block.

    Raises:
        ValueError: duplicate experts, non-Task items, ``workers < 1``.
    """
    L = _check_workers(workers)
    tasks = _check_tasks(tasks)
    heap1 = [(-t.work, t.expert, t) for t in tasks if t.kind == "I"]
    heap2 = [(-t.work, t.expert, t) for t in tasks if t.kind == "II"]
    heapq.heapify(heap1)
    heapq.heapify(heap2)
    blocks: list[Block] = []
    while heap1:
        opener = heapq.heappop(heap1)[2]
        members = [opener]
        io = opener.io_s
        comp = 0.0
        while heap2 and comp <= io:
            t = heapq.heappop(heap2)[2]
            members.append(t)
            io += t.io_s
            comp += t.compute_s / L
        blocks.append(Block(opener, tuple(members), io, comp))
    if heap2:
        rest = [heapq.heappop(heap2)[2] for _ in range(len(heap2))]
        blocks.append(Block(None, tuple(rest), sum(t.io_s for t in rest),
                            sum(t.compute_s for t in rest) / L))
    return blocks


def execution_order(blocks) -> list[Task]:
    """The order in which :func:`simulate` (and the engine) issues reads and decodes.

    Blocks in order; inside a block its Type-II tasks first (in the order added), then the
    opener. Type-II reads are short (an S-tier exponent, or none for C), so issuing them first
    lets the block's Type-II decodes run while the opener's long SM read holds the I/O thread,
    which is the overlap the block was formed for (§4).

    Args:
        blocks: list of :class:`Block`.

    Returns:
        list of :class:`Task`.
    """
    out: list[Task] = []
    for b in blocks:
        out.extend(t for t in b.tasks if t is not b.opener)
        if b.opener is not None:
            out.append(b.opener)
    return out


def simulate_order(order, workers) -> tuple[float, list[TaskTimes]]:
    """Event simulation of one I/O thread and ``L`` decode workers for a task order.

    The I/O thread reads the tasks with ``io_s > 0`` back to back in ``order`` (never idle until
    all reads are done); a task without I/O is ready at time 0, others when their read ends.
    Workers are greedy and never idle while a ready task waits: whenever a worker is free, it
    starts the first task in ``order`` that is ready and not started (waiting for the next
    read if none is). Decodes are not split across workers.

    Args:
        order: sequence of :class:`Task` (distinct experts).
        workers: L, ``>= 1``.

    Returns:
        ``(makespan_s, times)``: the time the last decode ends (0 for no tasks) and one
        :class:`TaskTimes` per task, in ``order``.

    Raises:
        ValueError: duplicate experts, ``workers < 1``.
    """
    L = _check_workers(workers)
    order = _check_tasks(order)
    n = len(order)
    rs = [0.0] * n
    re = [0.0] * n
    t_io = 0.0
    for i, t in enumerate(order):
        if t.io_s > 0:
            rs[i] = t_io
            t_io += t.io_s
            re[i] = t_io
    free = [(0.0, w) for w in range(L)]
    heapq.heapify(free)
    ds = [0.0] * n
    de = [0.0] * n
    wk = [0] * n
    pending = list(range(n))
    while pending:
        f, w = heapq.heappop(free)
        t = max(f, min(re[i] for i in pending))
        i = next(i for i in pending if re[i] <= t)
        pending.remove(i)
        ds[i] = t
        de[i] = t + order[i].compute_s
        wk[i] = w
        heapq.heappush(free, (de[i], w))
    times = [TaskTimes(t.expert, t.kind, rs[i], re[i], ds[i], de[i], wk[i])
             for i, t in enumerate(order)]
    return (max(de) if n else 0.0), times


def simulate(blocks, workers) -> tuple[float, list[TaskTimes]]:
    """Makespan of a block schedule: :func:`simulate_order` of :func:`execution_order`.

    Any such run is a non-idling list schedule, so (with ``OPT`` the best possible makespan and
    ``j`` the last task to finish, which waits only while all workers are busy after its read)
    ``makespan <= Σ io_s + (Σ compute_s − c_j)/L + c_j <= (3 − 1/L)·OPT`` (§4's bound); in fact
    ``<= (3 − 1/L)·``:func:`makespan_lower_bound`.

    Args:
        blocks: list of :class:`Block` (e.g. from :func:`schedule`).
        workers: L, ``>= 1``.

    Returns:
        ``(makespan_s, times)`` as :func:`simulate_order`, times in execution order.

    Raises:
        ValueError: as :func:`simulate_order`.
    """
    return simulate_order(execution_order(blocks), workers)


def makespan_lower_bound(tasks, workers) -> float:
    """A lower bound on any schedule's makespan (seconds): ``max(Σ io_s, Σ compute_s / L,
    max_i (io_s_i + compute_s_i))``: the I/O thread is serial, the workers' total work, and one
    task's own read then decode.

    Raises:
        ValueError: ``workers < 1``.
    """
    L = _check_workers(workers)
    tasks = list(tasks)
    if not tasks:
        return 0.0
    return max(sum(t.io_s for t in tasks), sum(t.compute_s for t in tasks) / L,
               max(t.io_s + t.compute_s for t in tasks))


_KIND = {"C": "II", "S": "II", "E": "I", "miss": "I"}


def tasks_from_tiers(tiers: dict, work: dict, delay: DelayModel,
                     include_matmul: bool = False) -> list[Task]:
    """Tasks of one layer from the selected experts' cache tiers (§2, §4).

    Per tier: ``io_s`` = C: 0, S: ``exp_read_s``, E: ``sm_read_s``, miss: ``sm_read_s +
    exp_read_s``; ``compute_s = decode_s`` (whole expert on one worker), plus
    ``work·matmul_s`` if ``include_matmul`` (the expert's matmul on the same worker); kind
    ``"I"`` for E and miss, ``"II"`` for S and C. F-tier experts get no task.

    Args:
        tiers: ``{expert: tier}`` with tiers ``"F", "C", "S", "E", "miss"``.
        work: ``{expert: tokens routed}`` (missing experts count 0).
        delay: the :class:`~zipmoe_rt.engine.planner.DelayModel`.
        include_matmul: add the matmul time to ``compute_s``.

    Returns:
        list of :class:`Task`, sorted by expert id.

    Raises:
        ValueError: unknown tier.
    """
    out = []
    for e in sorted(tiers):
        tier = tiers[e]
        if tier == "F":
            continue
        if tier not in _KIND:
            raise ValueError(f"unknown tier {tier!r} for expert {e}")
        io = {"C": 0.0, "S": delay.exp_read_s, "E": delay.sm_read_s,
              "miss": delay.sm_read_s + delay.exp_read_s}[tier]
        wk = float(work.get(e, 0))
        comp = delay.decode_s + (wk * delay.matmul_s if include_matmul else 0.0)
        out.append(Task(int(e), _KIND[tier], wk, float(io), float(comp)))
    return out
