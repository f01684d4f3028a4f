"""Expected makespan and bytes of every tier plan of one layer (ZipMoE, arXiv 2601.21198 §3.5).

A static plan puts consecutive popularity ranks in tiers F, C, S, E and leaves the rest as
misses. :func:`expected_layer_makespan` prices one plan by summing over all hit tuples (the
reference); :func:`layer_frontier` prices all plans at once by range elementary symmetric
polynomials (:func:`range_esp`) and a shared E/miss tail (:func:`tail_sums`), which
:mod:`.locality` reuses for recency F pools.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .checks import check_int, check_k, check_weights
from .conditional_poisson import pool_hit_distribution, split_weights
from .delay import TIERS, DelayModel


def expected_layer_makespan(w, counts_per_tier, k, delay: DelayModel) -> float:
    """Expected makespan (seconds) of one layer for one token under a tier plan (§3.5).

    ``Σ_h P(h)·delay.layer_makespan(h)`` over hits per tier, ``P`` from
    :func:`pool_hit_distribution` with pools F, C, S, E, miss taking consecutive ranks (the
    experts sorted by ``w`` descending, i.e. most popular first). Reference implementation (a
    sum over all hit tuples); :func:`layer_frontier` computes the same for all plans at once.

    Args:
        w: float ``[N]`` conditional-Poisson weights (any order; sorted descending here).
        counts_per_tier: ``(nF, nC, nS, nE)``, non-negative, summing to at most ``N``; the other
            ``N − Σ`` experts are misses.
        k: experts per token, ``1..N``.
        delay: the :class:`DelayModel`.

    Returns:
        float seconds.

    Raises:
        ValueError: bad counts, ``k`` out of range, weights as in :func:`pool_hit_distribution`.
    """
    w = check_weights(w, allow_inf=True)
    n = w.shape[0]
    k = check_k(k, n)
    cnt = [check_int(c, "counts_per_tier") for c in counts_per_tier]
    if len(cnt) != 4 or min(cnt) < 0 or sum(cnt) > n:
        raise ValueError(f"counts_per_tier must be 4 non-negative counts summing to <= {n}, "
                         f"got {counts_per_tier}")
    ws = -np.sort(-w)
    bounds = np.concatenate([[0], np.cumsum(cnt), [n]])
    pools = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    dist = pool_hit_distribution(ws, pools, k)
    return float(sum(pr * delay.layer_makespan(dict(zip(TIERS, h))) for h, pr in dist.items()))


def range_esp(w: np.ndarray, k: int) -> np.ndarray:
    """Range elementary symmetric polynomials: ``R[a, b, h] = e_h(w[a:b])`` (§3.5).

    ``R[a, b]`` holds the coefficients ``0..k`` of ``Π_{a<=i<b} g_i(x)`` with
    ``g_i = 1 + w_i x`` (``x`` for ``w_i = inf``: always selected), built by one DP step per
    ``b`` for all ``a`` at once (sums of non-negative terms only).

    Args:
        w: float64 ``[N]`` weights, ``>= 0``, ``inf`` allowed, already checked and scaled (the
            caller divides by the largest finite weight so that nothing overflows).
        k: highest degree.

    Returns:
        float64 ``[N+1, N+1, k+1]``; entries with ``a > b`` are 0.
    """
    n = w.shape[0]
    R = np.zeros((n + 1, n + 1, k + 1))
    idx = np.arange(n + 1)
    R[idx, idx, 0] = 1.0
    for b in range(1, n + 1):
        prev = R[:b, b - 1, :]
        x = w[b - 1]
        new = np.zeros_like(prev)
        if np.isinf(x):
            new[:, 1:] = prev[:, :-1]
        else:
            new[:] = prev
            new[:, 1:] += x * prev[:, :-1]
        R[:b, b, :] = new
    return R


class LayerFrontier(NamedTuple):
    """Every plan of one layer evaluated by :func:`layer_frontier` (arrays of equal length M).

    Attributes:
        counts: int64 ``[M, 4]``: ``(nF, nC, nS, nE)`` per plan.
        bytes: float64 ``[M]``: cache bytes per plan (:meth:`DelayModel.plan_bytes`).
        makespan_s: float64 ``[M]``: expected layer makespan per plan (seconds).
    """

    counts: np.ndarray
    bytes: np.ndarray
    makespan_s: np.ndarray

    def pareto(self) -> "LayerFrontier":
        """The Pareto-optimal plans (no other plan is both cheaper-or-equal in bytes and faster),
        sorted by bytes ascending (makespan strictly descending); ties keep the plan that
        :func:`plan_layer` would pick."""
        # cheap superset first
        pre = pareto_superset(np.argsort(self.bytes, kind="stable"), self.makespan_s)
        sub = LayerFrontier(self.counts[pre], self.bytes[pre], self.makespan_s[pre])
        order = pre[_preference_order(sub)]
        em = self.makespan_s[order]
        # within equal bytes the first is the preferred (fastest); keep strict improvements only
        best = np.minimum.accumulate(em)
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = em[1:] < best[:-1] * (1 - 1e-12) - 1e-300
        sel = order[keep]
        return LayerFrontier(self.counts[sel], self.bytes[sel], self.makespan_s[sel])


def pareto_superset(by_bytes: np.ndarray, makespan_s: np.ndarray) -> np.ndarray:
    """The plans that may be Pareto-optimal, found cheaply: those no slower (up to a relative
    ``1e-9``) than every plan before them in ``by_bytes`` order. A superset of the Pareto
    plans, which :meth:`LayerFrontier.pareto` then filters exactly.

    Args:
        by_bytes: int ``[M]`` plan indices sorted by bytes ascending (stable).
        makespan_s: float64 ``[≥ M]`` makespan per plan index (seconds).

    Returns:
        The kept entries of ``by_bytes``, in its order.
    """
    e = makespan_s[by_bytes]
    return by_bytes[e <= np.minimum.accumulate(e) * (1 + 1e-9) + 1e-300]


def _preference_order(t: LayerFrontier) -> np.ndarray:
    """Plans sorted by (bytes, makespan, −nF, −nC, −nS, −nE)."""
    c = t.counts
    return np.lexsort((-c[:, 3], -c[:, 2], -c[:, 1], -c[:, 0], t.makespan_s, t.bytes))


def boundary_grid(n: int, step: int) -> np.ndarray:
    """Pool boundaries a plan may use: the multiples of ``step`` in ``0..n``, and ``n``.

    Returns:
        int64 ``[G]``, ascending, starting at 0 and ending at ``n``.

    Raises:
        ValueError: ``step`` not an integer or ``< 1``.
    """
    step = check_int(step, "step")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return np.unique(np.concatenate([np.arange(0, n + 1, step), [n]]))


class TailSums(NamedTuple):
    """The E/miss tail of the range-ESP factorisation, computed by :func:`tail_sums` for all
    ``(a3, a4)`` boundary pairs on a grid (``P`` pairs, ``T`` hit triples, ``G`` groups).
    """

    tri: np.ndarray        # [T, 3] hit triples (hF, hC, hS), sorted by (hF, hC)
    hS: np.ndarray         # [T]
    pairs_fc: np.ndarray   # [G, 2] distinct (hF, hC)
    starts: np.ndarray     # [G] first triple of each (hF, hC) group
    Z: np.ndarray          # [P, T] tail sums per (a3, a4) pair
    a3p: np.ndarray        # [P]
    a4p: np.ndarray        # [P]
    row_start: np.ndarray  # [len(grid)] first pair with a3 >= grid[i]


def tail_sums(R: np.ndarray, n: int, grid: np.ndarray, k: int, delay: DelayModel) -> TailSums:
    """The E/miss tail of :func:`layer_frontier` (shared with :func:`.locality.layer_frontier_lru`).

    ``Z[(a3,a4), (hF,hC,hS)] = Σ_hm R[a3,a4,r−hm]·R[a4,N,hm]·M(hF, r, hS+hm)`` with
    ``r = k−hF−hC−hS`` and ``M`` the part of :meth:`DelayModel.layer_makespan` before the
    matmuls (the engine terms included), for every boundary pair ``a3 <= a4`` of ``grid``
    (see :func:`layer_frontier`).

    Args:
        R: float64 ``[N+1, N+1, k+1]`` from :func:`range_esp`.
        n: experts in the layer, ``N``.
        grid: int64 ``[G]`` boundaries (:func:`boundary_grid`).
        k: experts per token.
        delay: the :class:`DelayModel`.

    Returns:
        :class:`TailSums`.
    """
    # hit triples t = (hF, hC, hS) with hF + hC + hS <= k, sorted by (hF, hC); r = hE + hm = rest
    tri = np.array([(f, c, s) for f in range(k + 1) for c in range(k + 1 - f)
                    for s in range(k + 1 - f - c)], dtype=np.int64)
    hF, hC, hS = tri[:, 0], tri[:, 1], tri[:, 2]
    hr = k - hF - hC - hS
    pairs_fc, starts = np.unique(tri[:, :2], axis=0, return_index=True)   # (hF, hC) groups
    hm = np.arange(k + 1)
    # M(hF, r, hS + hm) for hm <= r (zero weight otherwise)
    valid = hm[None, :] <= hr[:, None]
    dC, xC = delay.c_hit_cost(hC)                                          # C hits' decodes, extra s
    io, comp = delay.io_and_compute((k - hF - hC + dC)[:, None], hr[:, None],
                                    hS[:, None] + hm[None, :])
    rm = np.clip(hr[:, None] - hm[None, :], 0, k)                          # hE = r − hm
    # the engine's own terms (DelayModel.engine_overhead_s), clamped as layer_makespan clamps
    eng = delay.engine_overhead_s(hC[:, None], hS[:, None], rm, hm[None, :])
    Mrow = np.where(valid, np.maximum(np.maximum(io, comp) + xC[:, None] + eng,
                                      -delay.matmul_time(k)), 0.0)         # [T, k+1]

    # tail over all (a3, a4) pairs, ordered by a3 then a4:
    #   Z[(a3,a4), t] = Σ_hm R[a3,a4,r−hm]·R[a4,N,hm]·M(hF, r, hS+hm)
    ng = len(grid)
    j3, j4 = np.triu_indices(ng)
    a3p, a4p = grid[j3], grid[j4]
    RE = R[a3p, a4p]                                                       # [P, k+1]
    Rm = R[a4p, n]                                                         # [P, k+1]
    Z = np.einsum("ptm,pm,tm->pt", RE[:, rm], Rm, Mrow, optimize=True)     # [P, T]
    row_start = np.searchsorted(j3, np.arange(ng))
    return TailSums(tri, hS, pairs_fc, starts, Z, a3p, a4p, row_start)


def layer_frontier(w, k, delay: DelayModel, step: int = 1) -> LayerFrontier:
    """Expected makespan and bytes of every tier plan of one layer (§3.5), all at once.

    Plans are pool boundaries ``0 <= a1 <= a2 <= a3 <= a4 <= N`` on the ranks (experts sorted by
    ``w`` descending): F = ranks ``[0, a1)``, C = ``[a1, a2)``, S = ``[a2, a3)``, E = ``[a3, a4)``,
    miss = the rest. With ``step > 1`` the boundaries are restricted to multiples of ``step`` (and
    ``N``), cutting the ``O(N⁴)`` plans by ``step⁴``.

    Method: the makespan depends on the hits only through ``hF`` (decodes ``= k − hF``), the SM
    reads ``r = hE + hmiss`` and the exponent reads ``hS + hmiss``. With range ESPs
    ``R[a, b, h] = e_h(w[a:b])`` (:func:`elementary_symmetric`, ``inf`` = always selected),
    ``P(h) = R[0,a1,hF]·R[a1,a2,hC]·R[a2,a3,hS]·R[a3,a4,hE]·R[a4,N,hm] / R[0,N,k]``. The tail
    ``Z[(a3,a4), (hF,hC,hS)] = Σ_hm R[a3,a4,r−hm]·R[a4,N,hm]·M(hF, r, hS+hm)`` (``r = k−hF−hC−hS``)
    is computed once for all ``(a3, a4)``; for each ``a2``,
    ``Y[(a3,a4), (hF,hC)] = Σ_hS R[a2,a3,hS]·Z`` and ``G[a1, (hF,hC)] = R[0,a1,hF]·R[a1,a2,hC]``
    give the expectations of all plans with that ``a2`` by one matrix product ``G·Yᵀ``
    (``O(N⁴·k²/24)`` multiply-adds in BLAS). Equal to :func:`expected_layer_makespan` to
    rounding (the sums have non-negative terms only).

    Args:
        w: float ``[N]`` conditional-Poisson weights (``inf`` = always selected).
        k: experts per token, ``1..N``.
        delay: the :class:`DelayModel`.
        step: boundary grid step, ``>= 1``.

    Returns:
        :class:`LayerFrontier` of all plans on the grid.

    Raises:
        ValueError: ``k`` out of range, bad weights (see :func:`cp_inclusion`), ``step < 1``.
    """
    w = check_weights(w, allow_inf=True)
    n = w.shape[0]
    k = check_k(k, n)
    split_weights(w, k)
    ws = -np.sort(-w)
    fin = np.isfinite(ws)
    if fin.any() and ws[fin].max() > 0:
        ws = ws.copy()
        ws[fin] = ws[fin] / ws[fin].max()
    R = range_esp(ws, k)
    ek = R[0, n, k]
    grid = boundary_grid(n, step)

    tl = tail_sums(R, n, grid, k, delay)
    hS, pairs_fc, starts, Z = tl.hS, tl.pairs_fc, tl.starts, tl.Z
    a3p, a4p, row_start, ng = tl.a3p, tl.a4p, tl.row_start, len(grid)

    out_c, out_m = [], []
    bF, bC, bS, bE = (float(delay.bytes_F), float(delay.bytes_C), float(delay.bytes_sm),
                      float(delay.bytes_exp))
    for i2 in range(ng):
        a2 = grid[i2]
        sl = slice(row_start[i2], None)                                    # pairs with a3 >= a2
        a3s, a4s = a3p[sl], a4p[sl]
        # Y[(a3,a4), (hF,hC)] = Σ_hS R[a2,a3,hS]·Z[(a3,a4), (hF,hC,hS)]
        Y = np.add.reduceat(R[a2, a3s][:, hS] * Z[sl], starts, axis=1)     # [P2, G]
        a1s = grid[: i2 + 1]
        # G[a1, (hF,hC)] = R[0,a1,hF]·R[a1,a2,hC]
        Gm = R[0, a1s][:, pairs_fc[:, 0]] * R[a1s, a2][:, pairs_fc[:, 1]]  # [n1, G]
        EM = Gm @ Y.T                                                      # [n1, P2]
        cnt = np.empty(EM.shape + (4,), dtype=np.int64)
        cnt[..., 0] = a1s[:, None]
        cnt[..., 1] = (a2 - a1s)[:, None]
        cnt[..., 2] = (a3s - a2)[None, :]
        cnt[..., 3] = (a4s - a3s)[None, :]
        out_c.append(cnt.reshape(-1, 4))
        out_m.append(EM.reshape(-1))
    counts = np.concatenate(out_c)
    em = np.concatenate(out_m) / ek + delay.matmul_time(k)
    b = counts[:, 0] * bF + counts[:, 1] * bC + counts[:, 2] * bS + counts[:, 3] * bE
    return LayerFrontier(counts, b, em)
