"""Splitting one model-wide byte budget over the MoE layers (ZipMoE, arXiv 2601.21198 §3:
per-layer budgets): a multiple-choice knapsack over the layers' Pareto frontiers.

Each ``fronts[l]`` is a Pareto frontier (:meth:`~.frontier.LayerFrontier.pareto`: bytes
ascending, makespan strictly descending, index 0 the cheapest plan); a split is one plan index
per layer. :func:`split_greedy` and :func:`split_dp` are the two solvers and
:func:`refine_split` spends what either leaves; :func:`~.plan.plan_model` runs both and keeps
the better.
"""
from __future__ import annotations

import heapq
import math

import numpy as np


def lower_hull(b: np.ndarray, e: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of Pareto points.

    Args:
        b: float ``[M]`` bytes, ascending.
        e: float ``[M]`` makespans (seconds), descending.

    Returns:
        Ascending indices into ``b``/``e`` of the hull's vertices, first and last point
        included; points on a hull segment are dropped.
    """
    hull: list[int] = []
    for i in range(len(b)):
        while len(hull) >= 2:
            j, l = hull[-2], hull[-1]
            # drop l if it lies on or above the segment j→i
            if (e[l] - e[j]) * (b[i] - b[j]) >= (e[i] - e[j]) * (b[l] - b[j]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def split_greedy(fronts: list, total: float) -> list[int]:
    """Greedy marginal allocation over the lower convex hulls (see :func:`~.plan.plan_model`).

    Every layer starts at its first plan; repeatedly the next hull step with the largest
    makespan reduction per byte that still fits what is left of ``total`` is taken.

    Args:
        fronts: per layer, a Pareto :class:`~.frontier.LayerFrontier`.
        total: bytes for all layers.

    Returns:
        One plan index per layer.
    """
    L = len(fronts)
    hulls = [lower_hull(f.bytes, f.makespan_s) for f in fronts]
    pos = [0] * L                       # index into hulls[l] of the current vertex
    cur = [int(h[0]) for h in hulls]    # current Pareto index per layer (0 = no cache)
    left = total - sum(float(fronts[l].bytes[cur[l]]) for l in range(L))
    heap: list = []

    def push(l):
        h = hulls[l]
        if pos[l] + 1 < len(h):
            i, j = h[pos[l]], h[pos[l] + 1]
            f = fronts[l]
            db = f.bytes[j] - f.bytes[i]
            de = f.makespan_s[i] - f.makespan_s[j]
            heapq.heappush(heap, (-de / db if db > 0 else -math.inf, l))

    for l in range(L):
        push(l)
    while heap:
        _, l = heapq.heappop(heap)
        f = fronts[l]
        j = hulls[l][pos[l] + 1]
        db = float(f.bytes[j] - f.bytes[cur[l]])
        if db <= left:
            left -= db
            pos[l] += 1
            cur[l] = j
            push(l)
    return cur


def split_dp(fronts: list, total: float, quanta: int = 4096, exact_max: int = 1 << 16):
    """Min-plus dynamic programming over the budget in quanta (see :func:`~.plan.plan_model`).

    Exact (quantum = 1 byte) when every plan's bytes are integers and the usable budget is at
    most ``exact_max``; otherwise ``quanta`` quanta, each plan's bytes rounded up to whole
    quanta (never over budget).

    Args:
        fronts: per layer, a Pareto :class:`~.frontier.LayerFrontier`.
        total: bytes for all layers.
        quanta: budget steps when not exact.
        exact_max: largest budget solved byte by byte.

    Returns:
        One plan index per layer (all 0 when nothing fits beyond the cheapest plans).
    """
    L = len(fronts)
    cap = min(total, sum(float(f.bytes[-1]) for f in fronts))
    integral = all(np.array_equal(f.bytes, np.round(f.bytes)) for f in fronts)
    if integral and cap <= exact_max:
        q, Q = 1.0, int(math.floor(cap))
    else:
        q, Q = cap / quanta, quanta
    if Q <= 0 or q <= 0:
        return [0] * L
    V = np.zeros(Q + 1)
    choice = np.zeros((L, Q + 1), dtype=np.int32)
    costs = []
    for l, f in enumerate(fronts):
        c = np.ceil(f.bytes / q).astype(np.int64)
        costs.append(c)
        NV = np.full(Q + 1, np.inf)
        ch = choice[l]
        for i in np.flatnonzero(c <= Q):
            ci = int(c[i])
            cand = V[: Q + 1 - ci] + f.makespan_s[i]
            sub = NV[ci:]
            m = cand < sub
            sub[m] = cand[m]
            ch[ci:][m] = i
        V = NV
    cur = [0] * L
    j = Q
    for l in range(L - 1, -1, -1):
        i = int(choice[l, j])
        cur[l] = i
        j -= int(costs[l][i])
    return cur


def refine_split(fronts: list, cur: list[int], total: float) -> list[int]:
    """Spend the leftover budget: repeatedly the single best upgrade of one layer.

    Args:
        fronts: per layer, a Pareto :class:`~.frontier.LayerFrontier`.
        cur: one plan index per layer (not modified).
        total: bytes for all layers.

    Returns:
        The improved plan indices: while some layer can move to a faster plan within its
        bytes plus the leftover, the move with the largest makespan reduction is applied.
    """
    cur = list(cur)
    left = total - sum(float(f.bytes[i]) for f, i in zip(fronts, cur))
    while True:
        best_gain, best = 0.0, None
        for l, f in enumerate(fronts):
            lim = f.bytes[cur[l]] + left
            j = int(np.searchsorted(f.bytes, lim, side="right")) - 1
            gain = float(f.makespan_s[cur[l]] - f.makespan_s[j])
            if j > cur[l] and gain > best_gain:
                best_gain, best = gain, (l, j)
        if best is None:
            return cur
        l, j = best
        left -= float(fronts[l].bytes[j] - fronts[l].bytes[cur[l]])
        cur[l] = j
