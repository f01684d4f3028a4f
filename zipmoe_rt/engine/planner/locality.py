"""Temporal locality: a recency (LRU) F pool on top of static C/S/E tiers (ZipMoE, arXiv
2601.21198 §3.6 as the design note ``ZIPMOE.md`` extends it).

The conditional-Poisson design is memoryless; real routers are not: an expert used by one token
is used again by the next with probability ``ρ`` ≈ 0.3-0.6 (:func:`repeat_probability`). The
engine's F tier is a recency pool of ``nF`` experts on top of static C/S/E slots;
:class:`FPoolModel` gives its hits per capacity, replayed on the trace's token sequences
(:func:`lru_pool_model`) or from ``π`` and ``ρ`` by a mixture formula
(:func:`locality_pool_model`); :func:`layer_frontier_lru` prices every plan with it.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .checks import check_int, check_k, check_vector
from .delay import DelayModel
from .frontier import LayerFrontier, boundary_grid, pareto_superset, range_esp, tail_sums


class FPoolModel(NamedTuple):
    """How one layer's recency F pool (LRU eviction over the layer's experts, optionally with
    frequency-aware admission) behaves at every capacity; the input of
    :func:`layer_frontier_lru`. Built from the trace's token sequences (:func:`lru_pool_model`,
    exact for the recorded routing) or from popularity and the repeat probability alone
    (:func:`locality_pool_model`, an approximation of plain LRU).

    Attributes:
        hit_pmf: float64 ``[N+1, k+1]``: row ``C`` = distribution of ``hF``, the number of one
            token's ``k`` experts found in an LRU pool of ``C`` experts (rows sum to 1).
        miss_rate: float64 ``[N+1, N]``: row ``C`` = per expert (expert-id order), the expected
            number of times per token it is selected and not in the pool, i.e. has to be rebuilt
            from its static tier; ``Σ_i miss_rate[C, i] = k − E[hF]``.
    """

    hit_pmf: np.ndarray
    miss_rate: np.ndarray

    def expected_hits(self) -> np.ndarray:
        """``E[hF]`` per capacity ``C = 0..N``: float64 ``[N+1]``."""
        return self.hit_pmf @ np.arange(self.hit_pmf.shape[1])


def _runs(sequences, name: str = "sequences") -> list:
    out = []
    for r in sequences:
        a = np.asarray(r, dtype=np.int64)
        if a.size == 0:
            continue
        if a.ndim != 3:
            raise ValueError(f"{name}: each run must be [tokens, layers, k], got shape {a.shape}")
        out.append(a)
    if out and len({a.shape[1:] for a in out}) != 1:
        raise ValueError(f"{name}: runs disagree in [layers, k]: {sorted({a.shape[1:] for a in out})}")
    return out


def repeat_probability(sequences) -> np.ndarray:
    """Temporal locality per layer: how often an expert used by a token is used again by the next.

    ``ρ_l = Σ_t |S_t ∩ S_{t−1}| / Σ_t |S_t|`` over consecutive tokens ``t−1, t`` of the same run
    (``S_t`` = the distinct experts token ``t`` selects in layer ``l``), i.e. the probability that
    a selected expert was also selected by the previous token. Memoryless routing with inclusion
    probabilities ``π`` gives ``Σπ_i²/k`` (``k/N`` when uniform); real routers give much more.

    Args:
        sequences: runs (e.g. one per prompt) of int arrays ``[T, L, k]``: expert ids selected by
            each decode token in each MoE layer (the trace's ``sequences``).

    Returns:
        float64 ``[L]`` (NaN for a layer without consecutive tokens: every run has one token).

    Raises:
        ValueError: a run that is not ``[T, L, k]``, runs of different ``[L, k]``, no runs.
    """
    runs = _runs(sequences)
    if not runs:
        raise ValueError("sequences: no tokens")
    L = runs[0].shape[1]
    rep = np.zeros(L)
    tot = np.zeros(L)
    for a in runs:
        for t in range(1, a.shape[0]):
            for l in range(L):
                cur = set(a[t, l].tolist())
                rep[l] += len(cur & set(a[t - 1, l].tolist()))
                tot[l] += len(cur)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, rep / np.maximum(tot, 1), np.nan)


#: frequency-aware admission of recency F pools (:func:`lru_pool_model`, the engine's zipmoe
#: pools): use counts are halved every ``ADMISSION_WINDOW · C · k`` selections of the layer
#: (``C`` = pool capacity), i.e. they count roughly the last 16 pool turnovers.
ADMISSION_WINDOW = 16


def admission_window(capacity: int, k: int) -> int:
    """Selections between halvings of the admission counts of an F pool holding ``capacity``
    experts in a top-``k`` layer (``ADMISSION_WINDOW · C · k``): the engine's pools and the
    planner's replay use this one value, so the replay is the engine's pool exactly."""
    return ADMISSION_WINDOW * capacity * k


def lru_pool_model(runs, n, k, warm=None, admission: bool = False) -> FPoolModel:
    """Trace-driven :class:`FPoolModel` of one layer: a recency pool of each capacity
    ``C = 0..N`` replayed on the recorded routing, exactly as the engine runs it.

    Per token: the selected experts already in the pool are hits (each moved to the most
    recent end, by ascending id), then each miss is counted and admitted by ascending id,
    evicting the least recently used expert when the pool is full (LRU). With ``admission``
    (the engine's zipmoe pools; TinyLFU-style) every selection also adds 1 to the expert's use
    count, all counts are halved (integer) every ``ADMISSION_WINDOW·C·k`` selections, and a
    miss is admitted into a full pool only if its count is at least the LRU victim's (else the
    pool is left as it is): an expert used once does not push out one that keeps coming back.
    The pool starts with ``warm[:C]`` (the engine's start: the ``C`` most popular experts, the
    most popular the most recent) and carries over from one run to the next, as the engine's
    pool does between prompts.

    Args:
        runs: runs of int arrays ``[T, k]``: the layer's selected expert ids per token
            (``k`` distinct ids in ``0..N−1`` per row).
        n: experts in the layer, ``N``.
        k: experts per token.
        warm: expert ids by descending popularity (the pool's initial contents), or None (empty).
        admission: frequency-aware admission as above (else plain LRU).

    Returns:
        :class:`FPoolModel` with the empirical ``hit_pmf`` and ``miss_rate`` (per recorded token).

    Raises:
        ValueError: rows that are not ``k`` distinct ids in ``0..N−1``, no tokens at all.
    """
    n = check_int(n, "n")
    k = check_k(k, n)
    rows = []
    for r in runs:
        a = np.asarray(r, dtype=np.int64)
        if a.size == 0:
            continue
        if a.ndim != 2 or a.shape[1] != k:
            raise ValueError(f"each run must be [tokens, k={k}], got shape {a.shape}")
        if a.min() < 0 or a.max() >= n:
            raise ValueError(f"expert ids must lie in 0..{n - 1}")
        srt = np.sort(a, axis=1)
        if (np.diff(srt, axis=1) == 0).any():
            raise ValueError(f"each token must select {k} distinct experts")
        rows.extend(tuple(x) for x in srt.tolist())
    if not rows:
        raise ValueError("no tokens to replay")
    warm = [] if warm is None else [int(e) for e in warm]
    hit = np.zeros((n + 1, k + 1))
    miss = np.zeros((n + 1, n), dtype=np.int64)
    for C in range(n + 1):
        pool: dict = {}                       # insertion order = recency (last = most recent)
        for e in reversed(warm[:C]):
            pool[e] = None
        freq = [0] * n
        window = admission_window(C, k) if admission else 0
        uses = 0
        hc, mc = hit[C], miss[C]
        for sel in rows:
            misses = []
            for e in sel:                     # hits first, moved to the recent end by id
                if window:
                    freq[e] += 1
                    uses += 1
                    if uses % window == 0:
                        freq = [f >> 1 for f in freq]
                if e in pool:
                    del pool[e]
                    pool[e] = None
                else:
                    misses.append(e)
            hc[k - len(misses)] += 1
            for e in misses:                  # then each miss is rebuilt and admitted, by id
                mc[e] += 1
                if C > 0:
                    if len(pool) >= C:
                        victim = next(iter(pool))
                        if window and freq[e] < freq[victim]:
                            continue
                        del pool[victim]
                    pool[e] = None
    return FPoolModel(hit / len(rows), miss / len(rows))


def locality_pool_model(pi, rho, k) -> FPoolModel:
    """:class:`FPoolModel` of one layer from popularity and temporal locality alone (for traces
    without token sequences): the mixture model

    ``q(C) = min(1, max(s(C), ρ·min(C, k)/k + (1 − ρ)·s(max(C − k, 0))))``

    where ``q(C)`` is the probability that a selected expert is in an LRU pool of ``C`` experts,
    ``ρ`` the repeat probability (:func:`repeat_probability`) and ``s(m) = Σ_{i<m} π_(i) / k``
    the share of selections that fall on the ``m`` most popular experts (``π`` sorted
    descending). Why: an LRU pool of ``C >= k`` experts always holds the previous token's ``k``
    experts, so a repeat (probability ``ρ``) hits; its other ``C − k`` entries are approximated
    by the most popular experts, which a fresh selection hits with probability
    ``s(C − k)``; with ``C < k`` it holds ``C`` of the previous token's ``k``. Popularity alone
    (a static pool of the top ``C``) gives ``s(C)``, hence the max. F hits per token are then
    ``Binomial(k, q(C))`` and every expert misses at the same rate,
    ``miss_rate[C, i] = π_i·(1 − q(C))`` (so the static tiers follow popularity).

    Args:
        pi: float ``[N]`` inclusion probabilities in expert-id order (``Σπ = k``, e.g. from
            :func:`inclusion_probabilities`).
        rho: repeat probability in ``[0, 1]``.
        k: experts per token, ``1..N``.

    Returns:
        :class:`FPoolModel`.

    Raises:
        ValueError: ``π`` outside ``[0, 1]`` or not summing to ``k``, ``ρ`` outside ``[0, 1]``,
            ``k`` out of range.
    """
    p = check_vector(pi, "pi")
    n = p.shape[0]
    k = check_k(k, n)
    if (p < 0).any() or (p > 1).any() or abs(float(p.sum()) - k) > 1e-9 * k:
        raise ValueError(f"pi must lie in [0, 1] and sum to k={k}")
    rho = float(rho)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho!r}")
    s = np.concatenate([[0.0], np.cumsum(-np.sort(-p))]) / k
    C = np.arange(n + 1)
    q = np.maximum(s, rho * np.minimum(C, k) / k + (1.0 - rho) * s[np.maximum(C - k, 0)])
    q = np.clip(q, 0.0, 1.0)
    h = np.arange(k + 1)
    binom = np.array([math.comb(k, int(j)) for j in h], dtype=np.float64)
    hit = binom[None, :] * q[:, None] ** h[None, :] * (1.0 - q[:, None]) ** (k - h)[None, :]
    return FPoolModel(hit, p[None, :] * (1.0 - q[:, None]))


def layer_frontier_lru(model: FPoolModel, k, delay: DelayModel, step: int = 1,
                       pareto: bool = False):
    """Expected makespan and bytes of every plan of one layer whose F tier is a recency pool.

    A plan is ``(nF, nC, nS, nE)``: a recency pool of ``nF`` full experts over all the layer's
    experts (behaving as ``model`` says), and static C, S, E slots for the experts ranked ``[0, nC)``, ``[nC, nC+nS)``,
    ``[nC+nS, nC+nS+nE)`` by their miss rate at capacity ``nF`` (``model.miss_rate[nF]``
    descending, ties by id): the experts that most often have to be rebuilt get the cheapest
    rebuilds. An expert in the pool is an F hit whatever its static tier; one not in it is
    rebuilt from its static slot (or from flash: miss). So ``nC + nS + nE <= N`` and
    ``0 <= nF <= N`` independently; bytes ``= nF·bytes_F + nC·bytes_C + nS·bytes_sm +
    nE·bytes_exp``. With a C tier in the compute form (``delay.bytes_c_form``) plans with both
    ``nF > 0`` and ``nC > 0`` are left out: the engine computes a C hit in place and never
    admits it to the pool, while ``model`` was replayed with every use outside the pool
    admitted, so it cannot price them (the pool would hold other experts than it counts).

    Model of one token: ``hF ~ model.hit_pmf[nF]``; the ``m = k − hF`` experts rebuilt are the
    Poisson design with ``p_i = miss_rate[nF, i]`` conditioned on ``m`` (weights
    ``w_i = p_i/(1 − p_i)``, :func:`pool_hit_distribution`'s form), so

    ``P(hF, hC, hS, hE, hm) = P(hF) · Π_pools e_{h_pool}(w_pool) / e_{k−hF}(w)``

    and ``E[makespan] = Σ P(h)·layer_makespan(h)`` (:meth:`DelayModel.layer_makespan`),
    computed for all ``(nC, nS, nE)`` at once by the same range-ESP factorisation as
    :func:`layer_frontier` with the F pool's polynomial ``P(hF)/e_{k−hF}(w)`` in place of
    ``R[0, a1]``: with ``Zc[(a3,a4), hC, hS] = Σ_hF P(hF)/e_{k−hF}(w) · Σ_hm R[a3,a4,hE]·
    R[a4,N,hm]·M(h)``, ``E[makespan](a2, a3, a4) = Σ_{hC,hS} R[0,a2,hC]·R[a2,a3,hS]·Zc`` for all
    boundaries by one matrix product per ``nF`` (``O(N³k²)``). Values of ``hF`` whose ``k − hF``
    misses the weights cannot produce (``e_{k−hF}(w) = 0``) are dropped and ``P(hF)``
    renormalised.

    Args:
        model: the layer's :class:`FPoolModel`.
        k: experts per token, ``1..N``.
        delay: the :class:`DelayModel`.
        step: grid step for ``nF`` and the static boundaries (see :func:`layer_frontier`).
        pareto: keep only each capacity's Pareto-optimal plans (:meth:`LayerFrontier.pareto`;
            what :func:`plan_model` needs, and far fewer: all plans are ``O(N⁴)``).

    Returns:
        ``(frontier, orders)``: :class:`LayerFrontier` of the plans (``counts`` columns
        ``nF, nC, nS, nE``) and ``orders[nF]`` = tuple of expert ids in static-tier rank order
        (None for capacities off the grid).

    Raises:
        ValueError: model arrays of the wrong shape or with negative entries, ``k`` out of range,
            ``step < 1``.
    """
    hit = np.asarray(model.hit_pmf, dtype=np.float64)
    miss = np.asarray(model.miss_rate, dtype=np.float64)
    if miss.ndim != 2 or miss.shape[0] != miss.shape[1] + 1:
        raise ValueError(f"miss_rate must be [N+1, N], got shape {miss.shape}")
    n = miss.shape[1]
    k = check_k(k, n)
    if hit.shape != (n + 1, k + 1):
        raise ValueError(f"hit_pmf must be [N+1, k+1] = {(n + 1, k + 1)}, got {hit.shape}")
    if not (np.isfinite(hit).all() and np.isfinite(miss).all()) or (hit < 0).any() \
            or (miss < 0).any():
        raise ValueError("hit_pmf and miss_rate must be finite and >= 0")
    grid = boundary_grid(n, step)
    bF, bC, bS, bE = (float(delay.bytes_F), float(delay.bytes_C), float(delay.bytes_sm),
                      float(delay.bytes_exp))
    orders: list = [None] * (n + 1)
    out_c, out_b, out_m = [], [], []
    hs = np.arange(k + 1)
    # the static boundaries (a2 <= a3 <= a4 on the grid) and their bytes: the same for every nF
    j3, j4 = np.triu_indices(len(grid))
    a3p, a4p = grid[j3], grid[j4]
    i2, ip = np.nonzero(a3p[None, :] >= grid[:, None])
    stat = np.stack([grid[i2], a3p[ip] - grid[i2], a4p[ip] - a3p[ip]], axis=1)
    b_stat = stat[:, 0] * bC + stat[:, 1] * bS + stat[:, 2] * bE
    by_bytes = np.argsort(b_stat, kind="stable")
    for C in grid:
        u = miss[C]
        order = np.lexsort((np.arange(n), -u))
        orders[C] = tuple(int(e) for e in order)
        p = np.clip(u[order], 0.0, 1.0 - 1e-9)
        ws = p / (1.0 - p)
        if ws.max() > 0:
            ws = ws / ws.max()
        R = range_esp(ws, k)
        e = R[0, n, k - hs]                       # e_{k−hF}(w) for hF = 0..k
        pF = hit[C]
        ok = (e > 0) & (pF > 0)
        if not ok.any():
            continue
        G = np.zeros(k + 1)
        G[ok] = pF[ok] / e[ok] / pF[ok].sum()
        tl = tail_sums(R, n, grid, k, delay)
        tF, tC, tS = tl.tri[:, 0], tl.tri[:, 1], tl.tri[:, 2]
        Zc = np.zeros((len(a3p), k + 1, k + 1))
        np.add.at(Zc, (slice(None), tC, tS), tl.Z * G[tF])     # Σ over hF
        # W[a2, p, hS] = Σ_hC R[0,a2,hC]·Zc[p,hC,hS] (one BLAS product), then Σ_hS R[a2,a3,hS]·W
        W = (R[0, grid] @ Zc.transpose(1, 0, 2).reshape(k + 1, -1)).reshape(len(grid), -1, k + 1)
        em = np.einsum("qs,qs->q", W[i2, ip], R[grid[i2], a3p[ip]]) + delay.matmul_time(k)
        if delay.bytes_c_form and C > 0:
            # C slots in the compute form are computed in place and never admitted to the
            # pool, which the replay (every use outside the pool admitted) does not model:
            # no plan of a pool and C slots together
            em = np.where(stat[:, 0] > 0, np.inf, em)
        keep = slice(None)
        if pareto:   # cheap superset first (as LayerFrontier.pareto), then the exact filter
            keep = pareto_superset(by_bytes, em)
        cnt = np.empty((len(stat[keep]), 4), dtype=np.int64)
        cnt[:, 0] = C
        cnt[:, 1:] = stat[keep]
        f = LayerFrontier(cnt, C * bF + b_stat[keep], em[keep])
        if pareto:
            f = f.pareto()
        fin = np.isfinite(f.makespan_s)
        f = LayerFrontier(f.counts[fin], f.bytes[fin], f.makespan_s[fin])
        out_c.append(f.counts)
        out_b.append(f.bytes)
        out_m.append(f.makespan_s)
    return LayerFrontier(np.concatenate(out_c), np.concatenate(out_b),
                         np.concatenate(out_m)), orders
