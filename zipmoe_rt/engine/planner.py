"""Cache-pool planning: how many experts of each layer to keep in each cache tier (ZipMoE §3).

Pure numpy, no I/O. The engine profiles a :class:`DelayModel`, records an activation trace
(``counts[l, e]`` = tokens that selected expert ``e`` in MoE layer ``l``) and calls
:func:`plan_model`; everything else here is the maths behind it, exposed so that it can be tested
piece by piece against brute force.

The pipeline (design note ``ZIPMOE.md`` §3, after ZipMoE, arXiv 2601.21198):

1. :func:`popularity_by_rank`: each layer's counts sorted descending and normalised (§3.1).
2. :func:`inclusion_probabilities`: scaled to ``π`` with ``Σπ = k`` (the true top-k), capped at 1
   (§3.2).
3. :func:`fit_conditional_poisson`: weights ``w`` of the conditional-Poisson (maximum-entropy)
   design ``P(S) ∝ Π_{i∈S} w_i`` over ``|S| = k`` whose inclusion probabilities are ``π``, by the
   IPF fixed point ``w ← w·π/π(w)`` (taken on the odds, damped); ``π(w)`` from
   elementary-symmetric-polynomial DPs (§3.3).
4. :func:`pool_hit_distribution`: pools are consecutive rank ranges (tiers F, C, S, E, miss, most
   popular first); hits per pool = independent Poisson-binomials (Bernoulli ``p = w/(1+w)``)
   conditioned on a total of ``k`` (§3.4).
5. :class:`DelayModel` and :func:`expected_layer_makespan`: ``Σ_h P(h)·makespan(h)``;
   :func:`plan_layer` grid-searches ``(nF, nC, nS, nE)`` under a byte budget (§3.5);
   :func:`plan_model` splits one model-wide budget over the layers (all four tiers, the true k,
   per-layer budgets, as §3 asks).
6. Temporal locality (§3.6; the conditional-Poisson design is memoryless, real routers are not:
   an expert used by one token is used again by the next with probability ``ρ`` ≈ 0.3-0.6,
   :func:`repeat_probability`). The engine's F tier is a recency (LRU) pool of ``nF`` experts
   on top of static C/S/E slots; :class:`FPoolModel` gives its hits per capacity, replayed on
   the trace's token sequences (:func:`lru_pool_model`) or from ``π`` and ``ρ`` by a mixture
   formula (:func:`locality_pool_model`); :func:`layer_frontier_lru` prices every plan with
   it, and :func:`plan_model` (``fpool=``) splits the budget as in step 5.

Tier names used throughout: ``"F"`` (full BF16), ``"C"`` (sign+mantissa + compressed exponent),
``"S"`` (sign+mantissa only), ``"E"`` (compressed exponent only), ``"miss"`` (nothing) (§2).
"""
from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

import numpy as np

__all__ = [
    "TIERS",
    "popularity_by_rank",
    "inclusion_probabilities",
    "elementary_symmetric",
    "elementary_symmetric_leave_one_out",
    "cp_inclusion",
    "fit_conditional_poisson",
    "poisson_binomial",
    "pool_hit_distribution",
    "DelayModel",
    "expected_layer_makespan",
    "TierPlan",
    "LayerFrontier",
    "layer_frontier",
    "plan_layer",
    "FPoolModel",
    "ADMISSION_WINDOW",
    "admission_window",
    "repeat_probability",
    "lru_pool_model",
    "locality_pool_model",
    "layer_frontier_lru",
    "ModelPlan",
    "plan_model",
]

#: Cache tiers in rank order: the most popular experts go to the first one (§2, §3.4).
TIERS = ("F", "C", "S", "E", "miss")


# ------------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------------

def _as_int(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"{name} must be an integer, got {k!r}")
    return int(k)


def _vector(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def _weights(w, allow_inf: bool) -> np.ndarray:
    a = _vector(w, "w")
    if (a < 0).any():
        raise ValueError("w must be >= 0")
    if not allow_inf and np.isinf(a).any():
        raise ValueError("w must be finite")
    return a


# ------------------------------------------------------------------------------------------------
# §3.1-3.2: popularity by rank, inclusion probabilities
# ------------------------------------------------------------------------------------------------

def popularity_by_rank(counts, average: bool = False) -> np.ndarray:
    """Popularity-by-rank vectors from an activation trace (design note §3.1).

    Args:
        counts: array-like ``[L, N]`` of non-negative counts (int or float): ``counts[l, e]`` =
            tokens × selections of expert ``e`` in MoE layer ``l``.
        average: if True, return the mean over layers of the per-layer vectors (the design note's
            robust version: it does not care which expert is hot, only how skewed layers are).

    Returns:
        float64 ``[L, N]`` (each row sorted descending, summing to 1), or ``[N]`` if ``average``.

    Raises:
        ValueError: ``counts`` not 2-D or empty, negative or non-finite entries, or a layer whose
            counts are all zero (pass only MoE layers that the trace saw).
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"counts must be a non-empty [L, N] array, got shape {c.shape}")
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be finite and >= 0")
    tot = c.sum(axis=1)
    if (tot <= 0).any():
        raise ValueError(f"layers {np.flatnonzero(tot <= 0).tolist()} have no activations")
    pop = -np.sort(-c, axis=1) / tot[:, None]
    return pop.mean(axis=0) if average else pop


def inclusion_probabilities(pop, k) -> np.ndarray:
    """Scale a popularity vector to inclusion probabilities of a top-``k`` selection (§3.2).

    ``π = k·pop/Σpop``; entries above 1 are set to 1 and the remaining mass ``k − #capped`` is
    re-spread over the others in proportion to ``pop``, repeated until none exceeds 1. The result
    keeps the input's order.

    Args:
        pop: float ``[N]``, ``>= 0`` (any scale; e.g. a row of :func:`popularity_by_rank`).
        k: experts selected per token (the model's top-k), ``1 <= k <= #(pop > 0)``.

    Returns:
        float64 ``[N]`` with ``0 <= π <= 1``, ``Σπ = k`` (to rounding), ``π = 0`` where ``pop = 0``.

    Raises:
        ValueError: ``k < 1`` or not an integer, ``k`` larger than the number of experts with
            non-zero mass, ``pop`` not 1-D, negative or non-finite.
    """
    k = _as_int(k)
    p = _weights(pop, allow_inf=False)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    active = p > 0
    if k > int(active.sum()):
        raise ValueError(f"k={k} exceeds the {int(active.sum())} experts with non-zero mass")
    pi = np.zeros_like(p)
    fixed = np.zeros(p.shape, dtype=bool)
    while True:
        free = active & ~fixed
        rem = k - int(fixed.sum())
        if rem <= 0 or not free.any():
            pi[free] = 0.0
            break
        pi[free] = rem * p[free] / p[free].sum()
        over = free & (pi >= 1.0)
        if not over.any():
            break
        pi[over] = 1.0
        fixed |= over
    return pi


# ------------------------------------------------------------------------------------------------
# §3.3: elementary symmetric polynomials, conditional Poisson
# ------------------------------------------------------------------------------------------------

def elementary_symmetric(w, k) -> np.ndarray:
    """Elementary symmetric polynomials ``e_0..e_k`` of the weights ``w`` (§3.3).

    ``e_j = Σ_{|S|=j} Π_{i∈S} w_i``, by the DP ``e_j ← e_j + w_i·e_{j−1}`` over ``i`` (sums of
    non-negative terms only, so no cancellation; float64). ``e_j = 0`` for ``j > N``.

    Args:
        w: float ``[N]``, finite, ``>= 0``.
        k: highest degree, ``>= 0``.

    Returns:
        float64 ``[k+1]``.

    Raises:
        ValueError: negative, NaN or infinite weights, ``w`` not 1-D, ``k < 0``.
    """
    k = _as_int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    w = _weights(w, allow_inf=False)
    e = np.zeros(k + 1)
    e[0] = 1.0
    for x in w:
        e[1:] = e[1:] + x * e[:-1]
    return e


def _prefix_suffix(w: np.ndarray, k: int):
    """``P[i] = e_{0..k}(w[:i])``, ``S[i] = e_{0..k}(w[i:])`` (``[N+1, k+1]`` each)."""
    n = w.shape[0]
    P = np.zeros((n + 1, k + 1))
    S = np.zeros((n + 1, k + 1))
    P[0, 0] = 1.0
    S[n, 0] = 1.0
    for i in range(n):
        P[i + 1] = P[i]
        P[i + 1, 1:] += w[i] * P[i, :-1]
    for i in range(n - 1, -1, -1):
        S[i] = S[i + 1]
        S[i, 1:] += w[i] * S[i + 1, :-1]
    return P, S


def _loo(w: np.ndarray, k: int, degree: int) -> np.ndarray:
    """``e_degree(w without i)`` for every ``i``, as Σ_j P[i, j]·S[i+1, degree−j] (stable)."""
    P, S = _prefix_suffix(w, k)
    return np.einsum("ij,ij->i", P[:-1, : degree + 1], S[1:, degree::-1])


def elementary_symmetric_leave_one_out(w, k) -> np.ndarray:
    """``e_0..e_k`` of ``w`` with element ``i`` removed, for every ``i`` (§3.3).

    Computed as the product of the prefix polynomial ``Π_{j<i}(1+w_j x)`` and the suffix polynomial
    ``Π_{j>i}(1+w_j x)`` truncated at degree ``k``: only sums of non-negative terms, unlike the
    subtractive recursion ``e_j^{(−i)} = e_j − w_i e_{j−1}^{(−i)}``, which cancels catastrophically
    when ``w_i`` dominates. Cost ``O(N·k²)``.

    Args:
        w: float ``[N]``, finite, ``>= 0``.
        k: highest degree, ``>= 0``.

    Returns:
        float64 ``[N, k+1]``: row ``i`` is ``e_0..e_k(w_{−i})``.

    Raises:
        ValueError: as :func:`elementary_symmetric`.
    """
    k = _as_int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    w = _weights(w, allow_inf=False)
    P, S = _prefix_suffix(w, k)
    out = np.zeros((w.shape[0], k + 1))
    for j in range(k + 1):
        out[:, j] = np.einsum("ij,ij->i", P[:-1, : j + 1], S[1:, j::-1])
    return out


def _split_weights(w: np.ndarray, k: int):
    """Masks of always-selected (inf), positive-finite experts, and the remaining size."""
    inf = np.isinf(w)
    fin = (w > 0) & ~inf
    m = int(inf.sum())
    if m > k:
        raise ValueError(f"{m} infinite weights (always selected) exceed k={k}")
    if k - m > int(fin.sum()):
        raise ValueError(f"k={k} exceeds the {m + int(fin.sum())} experts with non-zero weight")
    return inf, fin, k - m


def cp_inclusion(w, k) -> np.ndarray:
    """Inclusion probabilities of conditional Poisson sampling (§3.3).

    The design draws a ``k``-subset ``S`` with ``P(S) ∝ Π_{i∈S} w_i``; then
    ``π_i = w_i·e_{k−1}(w_{−i}) / e_k(w)`` (leave-one-out ESPs by prefix×suffix, see
    :func:`elementary_symmetric_leave_one_out`). ``w`` is rescaled by ``1/max(w)`` first (the design
    is invariant to scale), so large weights cannot overflow. Conventions: ``w_i = inf`` means
    "always selected" (``π_i = 1``, the rest is a design of size ``k − #inf``), ``w_i = 0`` means
    never selected.

    Args:
        w: float ``[N]``, ``>= 0``, ``inf`` allowed.
        k: sample size, ``1 <= k``.

    Returns:
        float64 ``[N]``, ``Σπ = k``.

    Raises:
        ValueError: ``k < 1``, more than ``k`` infinite weights, fewer than ``k`` positive
            weights, negative or NaN weights.
    """
    k = _as_int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = _weights(w, allow_inf=True)
    inf, fin, kf = _split_weights(w, k)
    pi = np.zeros_like(w)
    pi[inf] = 1.0
    if kf > 0:
        pi[fin] = _cp_inclusion_finite(w[fin], kf)
    return pi


def _cp_inclusion_finite(x: np.ndarray, k: int) -> np.ndarray:
    """cp_inclusion for strictly positive finite ``x`` with ``1 <= k <= len(x)``."""
    x = x / x.max()
    P, S = _prefix_suffix(x, k)
    ek = P[-1, k]
    loo = np.einsum("ij,ij->i", P[:-1, :k], S[1:, k - 1::-1])
    return x * loo / ek


def fit_conditional_poisson(pi, k, tol: float = 1e-12, max_iter: int = 10000) -> np.ndarray:
    """Weights of the conditional-Poisson design with inclusion probabilities ``π`` (§3.3).

    IPF-style fixed point ``w ← w·π/π(w)`` (``π(w)`` by leave-one-out ESPs, see
    :func:`cp_inclusion`), taken on the odds and damped, started from the Poisson odds
    ``π/(1−π)``. Plain ``w·π/π(w)`` moves ``log w_i`` by ``≈ Δπ_i`` where ``Δπ_i/(π_i(1−π_i))`` is
    needed, so it crawls for ``π_i`` near 1 (thousands of iterations at ``π = 1 − 1e-5``). The
    same multiplicative correction applied to the odds, ``w_i·odds(π_i)/odds(π_i(w))``, simplifies
    to ``odds(π_i)·e_k(w_{−i})/e_{k−1}(w_{−i})`` (same fixed point); its Jacobian in ``log w`` is a
    stochastic matrix, whose eigenvalues near −1 (one dominant expert, ``k − #ones = 1``) make
    the full step oscillate, so the update is its geometric mean with the current ``w`` (a half
    step in log space, eigenvalues mapped into ``[0, 1]``). Measured: ≤ 33 iterations to
    ``1e-12`` over 3000 random targets (N ≤ 64, k ≤ 8, π down to 1e-12 and up to 1 − 1e-9).

    Entries with ``π_i = 1`` get ``w_i = inf`` (always selected; the rest is fitted as a design
    of size ``k − #ones``), entries with ``π_i = 0`` get ``w_i = 0``. The scale of ``w`` is free
    (the design is invariant to ``w → c·w``); the returned one is fixed so that the Poisson design
    with ``p_i = w_i/(1+w_i)`` has expected size ``k − #ones``, i.e. ``p ≈ π`` (this keeps
    :func:`pool_hit_distribution`'s Bernoulli form well conditioned).

    Args:
        pi: float ``[N]`` in ``[0, 1]`` summing to ``k`` (within ``1e-9·k``; e.g. from
            :func:`inclusion_probabilities`).
        k: sample size, ``>= 1``.
        tol: stop when ``max_i |π_i(w) − π_i| <= tol + |Σπ − k|`` (the second term is the
            inconsistency of the target, zero for an exact one).
        max_iter: iteration limit.

    Returns:
        float64 ``[N]`` weights (``inf`` / ``0`` where ``π`` is 1 / 0).

    Raises:
        ValueError: ``π`` outside ``[0, 1]``, ``|Σπ − k| > 1e-9·k``, ``k < 1``.
        RuntimeError: not converged within ``max_iter`` iterations.
    """
    k = _as_int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = _vector(pi, "pi")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("pi must lie in [0, 1]")
    gap = abs(float(p.sum()) - k)
    if gap > 1e-9 * k:
        raise ValueError(f"pi sums to {p.sum()!r}, not k={k}")
    ones = p == 1.0
    free = (p > 0) & ~ones
    kf = k - int(ones.sum())
    w = np.zeros_like(p)
    w[ones] = np.inf
    if kf <= 0 or not free.any():
        return w
    t = p[free]
    odds = t / (1.0 - t)
    lim = tol + gap

    def evaluate(x):
        P, S = _prefix_suffix(x, kf)
        l0 = np.einsum("ij,ij->i", P[:-1, : kf + 1], S[1:, kf::-1])      # e_kf(x_{-i})
        l1 = np.einsum("ij,ij->i", P[:-1, :kf], S[1:, kf - 1::-1])       # e_kf-1(x_{-i})
        q = x * l1 / (l0 + x * l1)                                        # π_i(x)
        return float(np.max(np.abs(q - t))), l0, l1

    x = odds / odds.max()
    err, l0, l1 = evaluate(x)
    for _ in range(max_iter):
        if err <= lim:
            break
        # x·π/π(x) taken on the odds: x_i·odds(π_i)/odds(π_i(x)) = odds(π_i)·l0_i/l1_i, then
        # the geometric mean with x (a half step in log space; see the docstring)
        x = np.sqrt(x * (odds * l0 / l1))
        x /= x.max()
        err, l0, l1 = evaluate(x)
    else:
        raise RuntimeError(f"conditional-Poisson fit did not reach tol={tol} "
                           f"in {max_iter} iterations")
    # fix the free scale: Σ c·x/(1 + c·x) = kf, by bisection on log c (monotone in c)
    lo, hi = -800.0, 800.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        c = math.exp(mid) if mid < 700 else math.exp(700)
        s = float(np.sum(c * x / (1.0 + c * x)))
        if s < kf:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    w[free] = math.exp(min(0.5 * (lo + hi), 700.0)) * x
    return w


# ------------------------------------------------------------------------------------------------
# §3.4: Poisson-binomial, hits per pool
# ------------------------------------------------------------------------------------------------

def poisson_binomial(p) -> np.ndarray:
    """Distribution of the number of successes of independent Bernoulli trials (§3.4).

    DP ``f_j ← f_j·(1−p_i) + f_{j−1}·p_i`` (float64; all terms non-negative).

    Args:
        p: float ``[n]`` success probabilities in ``[0, 1]``.

    Returns:
        float64 ``[n+1]``: ``pmf[j] = P(#successes = j)``, summing to 1.

    Raises:
        ValueError: ``p`` not 1-D or outside ``[0, 1]``.
    """
    p = _vector(p, "p")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("p must lie in [0, 1]")
    f = np.zeros(p.shape[0] + 1)
    f[0] = 1.0
    for i, x in enumerate(p):
        f[1 : i + 2] = f[1 : i + 2] * (1.0 - x) + f[: i + 1] * x
        f[0] *= 1.0 - x
    return f


def _check_pools(pools, n: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    for pool in pools:
        a, b = (_as_int(v, "pool bound") for v in pool)
        if a != pos or b < a:
            raise ValueError(f"pools must be consecutive ranges from 0 to {n}, got {list(pools)}")
        out.append((a, b))
        pos = b
    if pos != n or not out:
        raise ValueError(f"pools must cover 0..{n}, got {list(pools)}")
    return out


def pool_hit_distribution(w, pools, k) -> dict[tuple[int, ...], float]:
    """Joint distribution of the hits per pool of one token's ``k`` selected experts (§3.4).

    With Bernoulli ``p_i = c·w_i/(1 + c·w_i)`` (independent: the Poisson design), the hits of pool
    ``j`` are Poisson-binomial (:func:`poisson_binomial`); the pools are independent, so
    ``P(h) = Π_j PB_j(h_j) / PB_all(k)`` for ``Σh = k``. This is exactly the conditional-Poisson
    design ``P(S) ∝ Π_{i∈S} w_i`` (conditioning the Poisson design on ``|S| = k`` leaves
    ``Π_{i∈S} p_i/(1−p_i) = Π_{i∈S} c·w_i``), for any ``c > 0``; ``c = 1/max(finite w)`` is used so
    that ``p <= 1/2`` whatever the scale of ``w``. ``w_i = inf`` gives ``p_i = 1`` (always
    selected), ``w_i = 0`` gives ``p_i = 0``.

    Args:
        w: float ``[N]`` conditional-Poisson weights, ``>= 0``, ``inf`` allowed, in the experts'
            index order (ranks if the pools are rank ranges).
        pools: consecutive index ranges ``[(0, a1), (a1, a2), ..., (a_{P−1}, N)]`` (empty allowed).
        k: sample size, ``>= 1``.

    Returns:
        dict mapping every tuple ``(h_0, ..., h_{P−1})`` with ``Σh = k`` and
        ``0 <= h_j <= pool size`` to its probability (values sum to 1).

    Raises:
        ValueError: pools not consecutive or not covering ``0..N``, ``k < 1``, fewer than ``k``
            positive weights, more than ``k`` infinite ones.
    """
    k = _as_int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = _weights(w, allow_inf=True)
    n = w.shape[0]
    pools = _check_pools(pools, n)
    _split_weights(w, k)
    inf = np.isinf(w)
    fin = w[~inf]
    c = 1.0 / fin.max() if fin.size and fin.max() > 0 else 1.0
    p = np.where(inf, 1.0, 0.0)
    p[~inf] = c * fin / (1.0 + c * fin)
    pmfs = [poisson_binomial(p[a:b]) for a, b in pools]
    total = poisson_binomial(p)[k]
    out: dict[tuple[int, ...], float] = {}
    sizes = [b - a for a, b in pools]
    for h in itertools.product(*(range(min(s, k) + 1) for s in sizes)):
        if sum(h) != k:
            continue
        out[h] = float(np.prod([pmfs[j][hj] for j, hj in enumerate(h)]) / total)
    return out


# ------------------------------------------------------------------------------------------------
# §3.5 / §4: the delay model
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DelayModel:
    """Profiled per-expert costs of one MoE layer, and the layer makespan they imply (§3.5, §4).

    Times are seconds, sizes bytes, all for one expert of the layer.

    Attributes:
        sm_read_s: read one expert's sign+mantissa planes from flash (on the single I/O thread).
        exp_read_s: read one expert's compressed exponent region from flash.
        decode_s: decompress + merge one whole expert on one worker.
        matmul_s: one expert's SwiGLU for one token.
        workers: L, the decode workers.
        bytes_F: cache bytes of a full BF16 expert (tier F).
        bytes_sm: bytes of its sign+mantissa planes (tier S; tier C holds ``bytes_sm + bytes_exp``).
        bytes_exp: bytes of its compressed exponent planes (tier E).
        chunks: independent decode pieces per expert (the engine's decode jobs,
            ``ExpertLayout.jobs``: runs of the paper's K exponent chunks, §1); a decode occupies
            one worker for ``decode_s / chunks`` per piece. Default 1.

    Makespan of one layer for one token (:meth:`layer_makespan`), given the hits per tier
    ``h = (hF, hC, hS, hE, hmiss)`` and ``k = Σh``::

        reads   = sm_read_s·(hE + hmiss) + exp_read_s·(hS + hmiss)            # one I/O channel
        io      = reads + (decode_s/chunks)·ceil(chunks / workers)  if reads > 0, else 0
        d       = hC + hS + hE + hmiss                                        # experts to decode
        compute = (decode_s/chunks) · ceil(d·chunks / workers)                # decodes on L workers
        matmul  = matmul_s · ceil(k / workers)
        makespan = max(io, compute) + matmul                                  (0 when k = 0)

    Why: §3 step 5 prices a layer as ``max(compute side, I/O side)``: the single I/O thread
    serialises the reads (Type-I tasks E and miss read the SM planes, S and miss read the
    exponent), and the decodes of C/S/E/miss are indivisible pieces spread over L identical
    workers, which take exactly ``ceil(pieces/L)`` rounds. The two overlap (§4's blocks exist to
    make them overlap), except that the expert read last cannot be decoded before its read ends:
    its own decode (its pieces over L workers) follows the I/O side. With that tail the max is the
    pipeline's two-resource lower bound; the §4 scheduler's list schedule is within ``(3 − 1/L)``
    of the true optimum. (Without the tail the model called an I/O-bound layer as fast as its
    reads alone, and planned S/E tiers that ran ~14 % slower on the default model at 444 MB
    than the plan the tail gives.) The token's ``k`` matmuls follow
    the weights they need; the last-ready expert's matmul cannot overlap its own preparation,
    and with ``k > L`` the matmuls take ``ceil(k/L)`` rounds, hence the additive term. It does
    not depend on the tiers, so it shifts every plan equally and never changes a planning
    decision; it only makes the predicted makespan an absolute time.

    Raises:
        ValueError: negative or non-finite times, ``workers < 1``, ``chunks < 1``, negative byte
            sizes.
    """

    sm_read_s: float
    exp_read_s: float
    decode_s: float
    matmul_s: float
    workers: int
    bytes_F: int
    bytes_sm: int
    bytes_exp: int
    chunks: int = 1

    def __post_init__(self):
        for name in ("sm_read_s", "exp_read_s", "decode_s", "matmul_s"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        for name in ("workers", "chunks"):
            if _as_int(getattr(self, name), name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("bytes_F", "bytes_sm", "bytes_exp"):
            v = getattr(self, name)
            if not math.isfinite(float(v)) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")

    @property
    def bytes_C(self):
        """Bytes of a tier-C expert: sign+mantissa plus compressed exponent."""
        return self.bytes_sm + self.bytes_exp

    def tier_bytes(self) -> dict[str, float]:
        """Cache bytes per expert of each tier, ``{"F", "C", "S", "E", "miss"}`` (miss = 0)."""
        return {"F": self.bytes_F, "C": self.bytes_C, "S": self.bytes_sm, "E": self.bytes_exp,
                "miss": 0}

    def plan_bytes(self, nF: int, nC: int, nS: int, nE: int):
        """Cache bytes of a layer plan with ``nF, nC, nS, nE`` experts in tiers F, C, S, E."""
        return nF * self.bytes_F + nC * self.bytes_C + nS * self.bytes_sm + nE * self.bytes_exp

    def _sides(self, d, n_sm, n_exp):
        """(io, compute) for ``d`` decodes, ``n_sm`` SM reads and ``n_exp`` exponent reads
        (arrays broadcast); io includes the decode of the expert read last."""
        reads = self.sm_read_s * np.asarray(n_sm) + self.exp_read_s * np.asarray(n_exp)
        piece = self.decode_s / self.chunks
        tail = piece * math.ceil(self.chunks / self.workers)
        io = reads + np.where((np.asarray(n_sm) + np.asarray(n_exp)) > 0, tail, 0.0)
        comp = piece * np.ceil(np.asarray(d) * self.chunks / self.workers)
        return io, comp

    def _matmul(self, k: int) -> float:
        return self.matmul_s * math.ceil(k / self.workers) if k > 0 else 0.0

    def layer_makespan(self, hits: dict) -> float:
        """Makespan in seconds of one layer for one token with ``hits[tier]`` experts per tier.

        Args:
            hits: ``{tier: count}`` over tiers ``"F", "C", "S", "E", "miss"`` (absent = 0).

        Returns:
            ``max(io, compute) + matmul`` as in the class docstring (seconds).

        Raises:
            ValueError: unknown tier or negative / non-integer count.
        """
        unknown = set(hits) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; expected {TIERS}")
        h = {t: _as_int(hits.get(t, 0), f"hits[{t}]") for t in TIERS}
        if any(v < 0 for v in h.values()):
            raise ValueError(f"negative hit count in {hits}")
        k = sum(h.values())
        if k == 0:
            return 0.0
        d = h["C"] + h["S"] + h["E"] + h["miss"]
        io, comp = self._sides(d, h["E"] + h["miss"], h["S"] + h["miss"])
        return float(max(io, float(comp))) + self._matmul(k)


# ------------------------------------------------------------------------------------------------
# §3.5: expected makespan, grid search
# ------------------------------------------------------------------------------------------------

def _check_k(k, n: int) -> int:
    k = _as_int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    return k


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
    w = _weights(w, allow_inf=True)
    n = w.shape[0]
    k = _check_k(k, n)
    cnt = [_as_int(c, "counts_per_tier") for c in counts_per_tier]
    if len(cnt) != 4 or min(cnt) < 0 or sum(cnt) > n:
        raise ValueError(f"counts_per_tier must be 4 non-negative counts summing to <= {n}, "
                         f"got {counts_per_tier}")
    ws = -np.sort(-w)
    bounds = np.concatenate([[0], np.cumsum(cnt), [n]])
    pools = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
    dist = pool_hit_distribution(ws, pools, k)
    return float(sum(pr * delay.layer_makespan(dict(zip(TIERS, h))) for h, pr in dist.items()))


def _range_esp(w: np.ndarray, k: int) -> np.ndarray:
    """``R[a, b] = coefficients 0..k of Π_{a<=i<b} g_i(x)`` with ``g_i = 1 + w_i x`` (``x`` for
    ``w_i = inf``: always selected), ``w`` already scaled. Shape ``[N+1, N+1, k+1]``."""
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
        # cheap superset first: plans no slower (up to 1e-9) than every plan sorted before them
        pre = np.argsort(self.bytes, kind="stable")
        e = self.makespan_s[pre]
        pre = pre[e <= np.minimum.accumulate(e) * (1 + 1e-9) + 1e-300]
        sub = LayerFrontier(self.counts[pre], self.bytes[pre], self.makespan_s[pre])
        order = pre[_preference_order(sub)]
        em = self.makespan_s[order]
        # within equal bytes the first is the preferred (fastest); keep strict improvements only
        best = np.minimum.accumulate(em)
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = em[1:] < best[:-1] * (1 - 1e-12) - 1e-300
        sel = order[keep]
        return LayerFrontier(self.counts[sel], self.bytes[sel], self.makespan_s[sel])


def _preference_order(t: LayerFrontier) -> np.ndarray:
    """Plans sorted by (bytes, makespan, −nF, −nC, −nS, −nE)."""
    c = t.counts
    return np.lexsort((-c[:, 3], -c[:, 2], -c[:, 1], -c[:, 0], t.makespan_s, t.bytes))


def _grid(n: int, step: int) -> np.ndarray:
    step = _as_int(step, "step")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return np.unique(np.concatenate([np.arange(0, n + 1, step), [n]]))


class _Tail(NamedTuple):
    tri: np.ndarray        # [T, 3] hit triples (hF, hC, hS), sorted by (hF, hC)
    hS: np.ndarray         # [T]
    pairs_fc: np.ndarray   # [G, 2] distinct (hF, hC)
    starts: np.ndarray     # [G] first triple of each (hF, hC) group
    Z: np.ndarray          # [P, T] tail sums per (a3, a4) pair
    a3p: np.ndarray        # [P]
    a4p: np.ndarray        # [P]
    row_start: np.ndarray  # [len(grid)] first pair with a3 >= grid[i]


def _tail(R: np.ndarray, n: int, grid: np.ndarray, k: int, delay: DelayModel) -> _Tail:
    """The E/miss tail of :func:`layer_frontier` (shared with :func:`layer_frontier_lru`)."""
    # hit triples t = (hF, hC, hS) with hF + hC + hS <= k, sorted by (hF, hC); r = hE + hm = rest
    tri = np.array([(f, c, s) for f in range(k + 1) for c in range(k + 1 - f)
                    for s in range(k + 1 - f - c)], dtype=np.int64)
    hF, hC, hS = tri[:, 0], tri[:, 1], tri[:, 2]
    hr = k - hF - hC - hS
    pairs_fc, starts = np.unique(tri[:, :2], axis=0, return_index=True)   # (hF, hC) groups
    hm = np.arange(k + 1)
    # M(hF, r, hS + hm) for hm <= r (zero weight otherwise)
    valid = hm[None, :] <= hr[:, None]
    io, comp = delay._sides(k - hF[:, None], hr[:, None], hS[:, None] + hm[None, :])
    Mrow = np.where(valid, np.maximum(io, comp), 0.0)                      # [T, k+1]
    rm = np.clip(hr[:, None] - hm[None, :], 0, k)                          # hE = r − hm

    # tail over all (a3, a4) pairs, ordered by a3 then a4:
    #   Z[(a3,a4), t] = Σ_hm R[a3,a4,r−hm]·R[a4,N,hm]·M(hF, r, hS+hm)
    ng = len(grid)
    j3, j4 = np.triu_indices(ng)
    a3p, a4p = grid[j3], grid[j4]
    RE = R[a3p, a4p]                                                       # [P, k+1]
    Rm = R[a4p, n]                                                         # [P, k+1]
    Z = np.einsum("ptm,pm,tm->pt", RE[:, rm], Rm, Mrow, optimize=True)     # [P, T]
    row_start = np.searchsorted(j3, np.arange(ng))
    return _Tail(tri, hS, pairs_fc, starts, Z, a3p, a4p, row_start)


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
    w = _weights(w, allow_inf=True)
    n = w.shape[0]
    k = _check_k(k, n)
    _split_weights(w, k)
    ws = -np.sort(-w)
    fin = np.isfinite(ws)
    if fin.any() and ws[fin].max() > 0:
        ws = ws.copy()
        ws[fin] = ws[fin] / ws[fin].max()
    R = _range_esp(ws, k)
    ek = R[0, n, k]
    grid = _grid(n, step)

    tl = _tail(R, n, grid, k, delay)
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
    em = np.concatenate(out_m) / ek + delay._matmul(k)
    b = counts[:, 0] * bF + counts[:, 1] * bC + counts[:, 2] * bS + counts[:, 3] * bE
    return LayerFrontier(counts, b, em)


# ------------------------------------------------------------------------------------------------
# §3.6: temporal locality: a recency (LRU) F pool on top of static C/S/E tiers
# ------------------------------------------------------------------------------------------------

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
    n = _as_int(n, "n")
    k = _check_k(k, n)
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
    p = _vector(pi, "pi")
    n = p.shape[0]
    k = _check_k(k, n)
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
    nE·bytes_exp``.

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
    k = _check_k(k, n)
    if hit.shape != (n + 1, k + 1):
        raise ValueError(f"hit_pmf must be [N+1, k+1] = {(n + 1, k + 1)}, got {hit.shape}")
    if not (np.isfinite(hit).all() and np.isfinite(miss).all()) or (hit < 0).any() \
            or (miss < 0).any():
        raise ValueError("hit_pmf and miss_rate must be finite and >= 0")
    grid = _grid(n, step)
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
        R = _range_esp(ws, k)
        e = R[0, n, k - hs]                       # e_{k−hF}(w) for hF = 0..k
        pF = hit[C]
        ok = (e > 0) & (pF > 0)
        if not ok.any():
            continue
        G = np.zeros(k + 1)
        G[ok] = pF[ok] / e[ok] / pF[ok].sum()
        tl = _tail(R, n, grid, k, delay)
        tF, tC, tS = tl.tri[:, 0], tl.tri[:, 1], tl.tri[:, 2]
        Zc = np.zeros((len(a3p), k + 1, k + 1))
        np.add.at(Zc, (slice(None), tC, tS), tl.Z * G[tF])     # Σ over hF
        # W[a2, p, hS] = Σ_hC R[0,a2,hC]·Zc[p,hC,hS] (one BLAS product), then Σ_hS R[a2,a3,hS]·W
        W = (R[0, grid] @ Zc.transpose(1, 0, 2).reshape(k + 1, -1)).reshape(len(grid), -1, k + 1)
        em = np.einsum("qs,qs->q", W[i2, ip], R[grid[i2], a3p[ip]]) + delay._matmul(k)
        keep = slice(None)
        if pareto:   # cheap superset first (as LayerFrontier.pareto), then the exact filter
            eo = em[by_bytes]
            keep = by_bytes[eo <= np.minimum.accumulate(eo) * (1 + 1e-9) + 1e-300]
        cnt = np.empty((len(stat[keep]), 4), dtype=np.int64)
        cnt[:, 0] = C
        cnt[:, 1:] = stat[keep]
        f = LayerFrontier(cnt, C * bF + b_stat[keep], em[keep])
        if pareto:
            f = f.pareto()
        out_c.append(f.counts)
        out_b.append(f.bytes)
        out_m.append(f.makespan_s)
    return LayerFrontier(np.concatenate(out_c), np.concatenate(out_b),
                         np.concatenate(out_m)), orders


@dataclass(frozen=True)
class TierPlan:
    """How many of one layer's experts each cache tier holds (§3).

    Static plan (``order is None``, :func:`plan_layer`, :func:`plan_model` without ``fpool``):
    by popularity rank, the ``nF`` most popular experts are tier F, the next ``nC`` tier C, then
    ``nS`` S, ``nE`` E; the rest are not cached (miss).

    Recency plan (``order`` set, :func:`plan_model` with ``fpool``, §3.6): F is an LRU pool of
    ``nF`` full experts over all the layer's experts, and the static slots go to
    ``order[:nC]`` (C), ``order[nC:nC+nS]`` (S), ``order[nC+nS:nC+nS+nE]`` (E); an expert in
    the pool is an F hit, one evicted from it falls back to its static slot (or to a miss).

    Attributes:
        nF, nC, nS, nE: experts per tier.
        predicted_makespan_s: expected layer makespan per token (seconds, :class:`DelayModel`).
        bytes: cache bytes the plan uses (:meth:`DelayModel.plan_bytes`).
        order: expert ids by static-tier rank (recency plans), or None (static plans).
    """

    nF: int
    nC: int
    nS: int
    nE: int
    predicted_makespan_s: float
    bytes: float
    order: tuple | None = None

    def tier_of_rank(self, num_experts: int) -> list[str]:
        """Tier name of each popularity rank ``0..num_experts−1`` (most popular first).

        Raises:
            ValueError: ``num_experts`` smaller than ``nF + nC + nS + nE``."""
        used = self.nF + self.nC + self.nS + self.nE
        if num_experts < used:
            raise ValueError(f"plan holds {used} experts > num_experts={num_experts}")
        return (["F"] * self.nF + ["C"] * self.nC + ["S"] * self.nS + ["E"] * self.nE
                + ["miss"] * (num_experts - used))


def _as_weights(pi_or_w, k: int, is_w) -> np.ndarray:
    a = _vector(pi_or_w, "pi_or_w")
    if is_w is None:
        is_w = not ((a >= 0).all() and (a <= 1).all() and abs(a.sum() - k) <= 1e-9 * k)
    if is_w:
        return _weights(a, allow_inf=True)
    return fit_conditional_poisson(a, k)


def _pick(t: LayerFrontier, budget: float) -> int:
    """Index of the fastest plan within ``budget``; ties (rel. 1e-12): fewer bytes, then more
    experts in the higher tiers (lexicographically larger ``(nF, nC, nS, nE)``)."""
    ok = np.flatnonzero(t.bytes <= budget)
    em = t.makespan_s[ok]
    best = em.min()
    cand = ok[em <= best * (1 + 1e-12) + 1e-300]
    sub = LayerFrontier(t.counts[cand], t.bytes[cand], t.makespan_s[cand])
    o = np.lexsort((-sub.counts[:, 3], -sub.counts[:, 2], -sub.counts[:, 1], -sub.counts[:, 0],
                    sub.bytes))
    return int(cand[o[0]])


def _plan_of(t: LayerFrontier, i: int, orders=None) -> TierPlan:
    c = t.counts[i]
    return TierPlan(int(c[0]), int(c[1]), int(c[2]), int(c[3]), float(t.makespan_s[i]),
                    float(t.bytes[i]), orders[int(c[0])] if orders is not None else None)


def _check_budget(b, name: str) -> float:
    b = float(b)
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {b!r}")
    return b


def plan_layer(pi_or_w, k, budget_bytes, delay: DelayModel, step: int = 1,
               is_w: bool | None = None) -> TierPlan:
    """The tier plan of one layer with the least expected makespan within a byte budget (§3.5).

    Exhaustive over all ``(nF, nC, nS, nE)`` on the boundary grid (:func:`layer_frontier`), so
    exact for ``step = 1``. Ties (relative ``1e-12``) go to fewer bytes, then to more experts in
    the higher tiers.

    Args:
        pi_or_w: float ``[N]``: inclusion probabilities (in ``[0, 1]``, summing to ``k``; fitted
            with :func:`fit_conditional_poisson`) or conditional-Poisson weights. Any order: the
            experts are ranked by it.
        k: experts per token, ``1..N``.
        budget_bytes: cache bytes this layer may use, ``>= 0``.
        delay: the :class:`DelayModel`.
        step: boundary grid step (see :func:`layer_frontier`).
        is_w: True = the input is weights, False = probabilities, None (default) = probabilities
            when all in ``[0, 1]`` with sum ``k`` (within ``1e-9·k``), else weights.

    Returns:
        :class:`TierPlan` (``bytes <= budget_bytes``).

    Raises:
        ValueError: negative or non-finite budget, ``k`` out of range, bad ``π`` / weights.
    """
    budget = _check_budget(budget_bytes, "budget_bytes")
    a = _vector(pi_or_w, "pi_or_w")
    k = _check_k(k, a.shape[0])
    w = _as_weights(a, k, is_w)
    t = layer_frontier(w, k, delay, step)
    return _plan_of(t, _pick(t, budget))


class ModelPlan(NamedTuple):
    """Result of :func:`plan_model`; unpacks as ``(layers, predicted_makespan_s)``.

    Attributes:
        layers: one :class:`TierPlan` per MoE layer, in trace order.
        predicted_makespan_s: Σ of the layers' expected makespans: the predicted MoE time of one
            token (seconds).
    """

    layers: list
    predicted_makespan_s: float

    @property
    def bytes(self) -> float:
        """Cache bytes of all layers together."""
        return float(sum(p.bytes for p in self.layers))


def _lower_hull(b: np.ndarray, e: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of Pareto points (bytes ascending, makespan descending)."""
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


def _split_greedy(fronts: list, total: float) -> list[int]:
    """Greedy marginal allocation over the lower convex hulls (see :func:`plan_model`)."""
    L = len(fronts)
    hulls = [_lower_hull(f.bytes, f.makespan_s) for f in fronts]
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


def _split_dp(fronts: list, total: float, quanta: int = 4096, exact_max: int = 1 << 16):
    """Min-plus DP over budget quanta (see :func:`plan_model`)."""
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


def _refine(fronts: list, cur: list[int], total: float) -> list[int]:
    """Spend the leftover budget: repeatedly the single best upgrade of one layer."""
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


def plan_model(counts, k, total_budget_bytes, delay: DelayModel, *, average: bool = False,
               step: int = 1, shape: tuple[int, int] | None = None,
               fpool: list | None = None) -> ModelPlan:
    """Tier plans of every MoE layer under one model-wide byte budget (§3, per-layer budgets).

    Per layer: popularity by rank (:func:`popularity_by_rank`), ``π``
    (:func:`inclusion_probabilities`), conditional-Poisson weights
    (:func:`fit_conditional_poisson`), and the Pareto frontier of all its tier plans, bytes vs
    expected makespan (:func:`layer_frontier`).

    Budget split, a multiple-choice knapsack over the layers' Pareto frontiers (pick one plan per
    layer, bytes summing to at most the budget, least total makespan); two solvers, each
    followed by a refinement, and the better result is returned:

    * Greedy marginal allocation on the lower convex hull of each frontier: every layer starts
      with no cache; repeatedly take, over all layers, the next hull step with the largest
      makespan reduction per byte that still fits the remaining budget (a layer whose next step
      does not fit takes no further hull steps). Up to the first refusal this is exactly the
      LP-relaxation optimum, so the result is within one hull step's makespan gain of the
      optimal split (and optimal when the budget lands on hull vertices). Good for many layers
      with fine-grained frontiers.
    * Min-plus dynamic programming over the budget in quanta: exact when every plan's bytes are
      integers and the budget is at most 65536 (quantum = 1 byte); otherwise 4096 quanta, each
      plan's bytes rounded up to whole quanta (never over budget, at most one quantum lost per
      layer). Fixes the greedy's coarse-hull cases (few layers, large steps).
    * Refinement of either: while some layer can move to a faster Pareto plan within its bytes
      plus the leftover budget, apply the single move with the largest reduction.

    Cost: one :func:`layer_frontier` per layer (``O(N⁴k²)`` flops in BLAS; one in total with
    ``average``), the DP ``O(L·P·4096)`` with ``P`` ≈ a few hundred Pareto plans per layer.

    With ``fpool`` (§3.6, temporal locality), each layer's F tier is a recency (LRU) pool
    described by its :class:`FPoolModel` and the frontier is :func:`layer_frontier_lru`'s
    (``O(N⁴k³)`` flops per layer in numpy); the plans carry ``order``, the expert ids of the
    static C/S/E ranks. ``counts`` is then only checked.

    Args:
        counts: ``[L, N]`` activation counts (tokens × selections per MoE layer and expert).
        k: experts per token, ``1..N``.
        total_budget_bytes: cache bytes for all layers' experts together, ``>= 0``.
        delay: the :class:`DelayModel` (one for all layers).
        average: plan every layer with the popularity vector averaged over layers (§3.1's robust
            version) instead of each layer's own.
        step: boundary grid step of :func:`layer_frontier`.
        shape: expected ``(L, N)`` of ``counts``, checked if given.
        fpool: per MoE layer, an :class:`FPoolModel` (recency F pools; see above), or None
            (static plans by popularity rank).

    Returns:
        :class:`ModelPlan` ``(layers, predicted_makespan_s)`` with
        ``Σ bytes <= total_budget_bytes``.

    Raises:
        ValueError: negative or non-finite budget, ``counts`` not ``[L, N]`` (or not ``shape``),
            negative counts, a layer with no activations, ``k`` out of range or larger than a
            layer's number of active experts, ``fpool`` not one model per layer or combined
            with ``average``.
        RuntimeError: a conditional-Poisson fit that does not converge.
    """
    total = _check_budget(total_budget_bytes, "total_budget_bytes")
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"counts must be [L, N], got shape {c.shape}")
    if shape is not None and tuple(c.shape) != tuple(shape):
        raise ValueError(f"counts has shape {c.shape}, expected {tuple(shape)}")
    n = c.shape[1]
    k = _check_k(k, n)
    orders = None
    if fpool is not None:
        if average:
            raise ValueError("fpool (recency F pools) cannot be combined with average=True")
        if len(fpool) != c.shape[0]:
            raise ValueError(f"fpool has {len(fpool)} models for {c.shape[0]} layers")
        fronts, orders = [], []
        for m in fpool:
            f, o = layer_frontier_lru(m, k, delay, step, pareto=True)
            fronts.append(f.pareto())
            orders.append(o)
    else:
        pop = popularity_by_rank(c, average=average)
        rows = [pop] if average else list(pop)
        fronts = []
        for row in rows:
            w = fit_conditional_poisson(inclusion_probabilities(row, k), k)
            fronts.append(layer_frontier(w, k, delay, step).pareto())
        if average:
            fronts = fronts * c.shape[0]
    L = len(fronts)

    cands = []
    for cur in (_split_greedy(fronts, total), _split_dp(fronts, total)):
        cur = _refine(fronts, cur, total)
        cost = sum(float(f.makespan_s[i]) for f, i in zip(fronts, cur))
        used = sum(float(f.bytes[i]) for f, i in zip(fronts, cur))
        if used <= total:
            cands.append((cost, used, cur))
    cur = min(cands, key=lambda c: (c[0], c[1]))[2]
    plans = [_plan_of(fronts[l], cur[l], orders[l] if orders else None) for l in range(L)]
    return ModelPlan(plans, float(sum(p.predicted_makespan_s for p in plans)))
