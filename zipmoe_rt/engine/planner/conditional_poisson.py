"""The activation model behind the planner: which ``k`` of a layer's ``N`` experts one token
selects (ZipMoE, arXiv 2601.21198 §3.1-3.4; design note ``ZIPMOE.md`` §3).

Popularity by rank from a trace (§3.1), inclusion probabilities ``π`` of a top-``k`` selection
(§3.2), the conditional-Poisson (maximum-entropy) design ``P(S) ∝ Π_{i∈S} w_i`` over ``|S| = k``
fitted to ``π`` by IPF on elementary-symmetric-polynomial DPs (§3.3), and the joint distribution
of a token's hits per pool of consecutive ranks by independent Poisson-binomials conditioned on
their total (§3.4). Pure numpy, float64, sums of non-negative terms only (no cancellation).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .checks import check_int, check_vector, check_weights


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
    k = check_int(k)
    p = check_weights(pop, allow_inf=False)
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
    k = check_int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    w = check_weights(w, allow_inf=False)
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


def _loo(P: np.ndarray, S: np.ndarray, degree: int) -> np.ndarray:
    """``e_degree(w without i)`` for every ``i`` from :func:`_prefix_suffix`'s tables, as
    ``Σ_j P[i, j]·S[i+1, degree−j]`` (non-negative terms only): float64 ``[N]``."""
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
    k = check_int(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    w = check_weights(w, allow_inf=False)
    P, S = _prefix_suffix(w, k)
    out = np.zeros((w.shape[0], k + 1))
    for j in range(k + 1):
        out[:, j] = _loo(P, S, j)
    return out


def split_weights(w: np.ndarray, k: int):
    """Check that conditional-Poisson weights can draw a ``k``-subset, and split them (§3.3).

    Args:
        w: float64 ``[N]`` weights, ``>= 0``, ``inf`` = always selected (already checked with
            :func:`~.checks.check_weights`).
        k: sample size.

    Returns:
        ``(inf, fin, kf)``: bool ``[N]`` mask of the always-selected experts, bool ``[N]`` mask
        of those with a positive finite weight, and ``kf = k − #inf``, the size left to draw
        among ``fin``.

    Raises:
        ValueError: more than ``k`` infinite weights, or fewer than ``k`` positive ones.
    """
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
    k = check_int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = check_weights(w, allow_inf=True)
    inf, fin, kf = split_weights(w, k)
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
    loo = _loo(P, S, k - 1)
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
    k = check_int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = check_vector(pi, "pi")
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
        l0 = _loo(P, S, kf)                                               # e_kf(x_{-i})
        l1 = _loo(P, S, kf - 1)                                           # e_kf-1(x_{-i})
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
    p = check_vector(p, "p")
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
        a, b = (check_int(v, "pool bound") for v in pool)
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
    k = check_int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    w = check_weights(w, allow_inf=True)
    n = w.shape[0]
    pools = _check_pools(pools, n)
    split_weights(w, k)
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
