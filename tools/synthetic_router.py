"""Router design of tools/make_synthetic_checkpoint.py: routing statistics, the fit of router
weights to hidden states for a target popularity skew and token-to-token locality, and a
simulation on proxy hidden states (see the tool's docstring for the model).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from synthetic_pools import one_blas_thread

#: exponential tilt toward the slowest principal components at --locality tilt +1.
TILT_MAX = 30.0


def routing_stats(logits: np.ndarray, k: int, seqs: int) -> dict:
    """Selection statistics of top-``k`` routing over ``logits`` [seqs*len, E] (sequences
    contiguous): top-1 share, share by rank, repeat probability P(e in S_t+1 | e in S_t)."""
    T, E = logits.shape
    sel = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    mask = np.zeros((T, E), bool)
    np.put_along_axis(mask, sel, True, axis=1)
    counts = mask.sum(0)
    share = np.sort(counts)[::-1] / (T * k)
    m = mask.reshape(seqs, T // seqs, E)
    rep = (m[:, 1:] & m[:, :-1]).sum() / (k * seqs * (T // seqs - 1))
    return {"top1_share": float(share[0]), "share_by_rank": share, "repeat": float(rep),
            "counts": counts}


def _bisect(f, lo, hi, iters=40):
    """Root of an increasing ``f`` on [lo, hi] (clamped to the ends)."""
    flo, fhi = f(lo), f(hi)
    if flo >= 0:
        return lo
    if fhi <= 0:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass
class RouterFit:
    weight: np.ndarray      # [E, H] float32 (before BF16 rounding)
    alpha: float            # Zipf exponent in units of sigma
    tau: float              # tilt in [-1, 1]: fast directions (-1) .. slowest PCs (+1)
    rank: np.ndarray        # popularity rank (1 = most popular) of each expert
    common_cos: float       # mean cosine of router inputs to their mean direction
    rho_range: tuple        # lag-1 autocorrelation: fast group, min and max over the top PCs
    achievable: tuple       # repeat probability at the tilt limits


def fit_router(X: np.ndarray, seqs: int, experts: int, top_k: int, skew: float | None,
               locality: float | None, sigma: float, rng: np.random.Generator,
               zipf: float | None = None, pcs: int = 32) -> RouterFit:
    """Router weights [E, H] for router inputs ``X`` [seqs*len, H] (sequences contiguous).

    logit_e(h) = beta_e <h,u>/mu + <w_e, h>, beta_e = -alpha sigma ln(rank_e); see the module
    docstring. ``alpha`` is fitted so the top-1 share of the selections over ``X`` is ``skew``
    (or set to ``zipf``), the tilt ``tau`` in [-1, 1] so the repeat probability over the odd
    sequences is ``locality`` (None: tau = 0, equal weights on the whitened top PCs).
    """
    T, H = X.shape
    X = X.astype(np.float64)
    m = X.mean(0)
    u = m / np.linalg.norm(m)
    p = X @ u
    mu = p.mean()
    common_cos = float(np.mean(p / np.linalg.norm(X, axis=1)))
    G = X - np.outer(p, u)
    G -= G.mean(0)
    L = T // seqs
    fit_seqs = np.arange(0, seqs, 2) if seqs >= 2 else np.arange(1)
    eval_seqs = np.arange(1, seqs, 2) if seqs >= 2 else np.arange(1)
    fr = (fit_seqs[:, None] * L + np.arange(L)[None, :]).ravel()
    ev = (eval_seqs[:, None] * L + np.arange(L)[None, :]).ravel()
    # principal components of the fitting sequences only: the evaluation sequences then see new
    # contexts, whose slow features leak outside the PCs, as held-out text does
    Gf = G[fr]
    if H <= len(fr):                                 # covariance or Gram matrix, the smaller
        lam, Vh = np.linalg.eigh(Gf.T @ Gf)
        lam, Vh = lam[::-1], Vh[:, ::-1]
    else:
        lam, Uu = np.linalg.eigh(Gf @ Gf.T)
        lam, Uu = lam[::-1], Uu[:, ::-1]
    K = int(min(pcs, max(2, (lam > lam[0] * 1e-10).sum() - 1), len(fr) // 8))
    s = np.sqrt(lam[:K])
    Vk = Vh[:, :K] if H <= len(fr) else (Gf.T @ Uu[:, :K]) / s
    sk = s / math.sqrt(len(fr))
    Z = (G @ Vk) / sk                                # whitened principal components [T, K]

    def lag1(N):            # lag-1 autocorrelation of each column over the fitting sequences
        Ns = N.reshape(seqs, L, -1)[fit_seqs]
        return (Ns[:, 1:] * Ns[:, :-1]).mean((0, 1)) / (Ns * Ns).mean((0, 1))

    rho = lag1(Z)                                     # slowness of each principal component
    C = rng.standard_normal((K, experts))
    # fast group: one random direction per expert outside span(u, top-K PCs)
    R = rng.standard_normal((H, experts))
    R -= np.outer(u, u @ R) + Vk @ (Vk.T @ R)
    F = G @ R
    fsd = F.std(0)
    F, R = F / fsd, R / fsd
    rho_out = float(lag1(F).mean())
    rank = np.empty(experts, np.int64)
    rank[rng.permutation(experts)] = np.arange(1, experts + 1)
    lnr = np.log(rank.astype(np.float64))
    pm = p / mu

    def noise(tilt):
        """(noise [T, E], z-space part [K, E], weight of the fast group [E]) for ``tilt`` in
        [-1, 1]: -1 = only the per-expert directions outside the top PCs (fastest), 0 = equal
        weights on the whitened top PCs, 1 = weights exp(TILT_MAX*rho_i) (slowest PCs)."""
        if tilt <= 0:
            f, q = -tilt, np.ones(K)
        else:
            f, q = 0.0, np.exp(tilt * TILT_MAX * (rho - rho.max()))
        W = C * np.sqrt(q / q.sum())[:, None]        # [K, E] in z space
        Nin = Z @ W
        sin = Nin.std(0)
        W = W * (math.sqrt(1.0 - f) / sin)
        fw = np.full(experts, math.sqrt(f))
        N = Z @ W + fw * F
        sc = sigma / N.std(0)
        return N * sc, W * sc, fw * sc

    def logits(alpha, N):
        return (-alpha * sigma) * pm[:, None] * lnr[None, :] + N

    def share(alpha, N):
        return routing_stats(logits(alpha, N), top_k, seqs)["top1_share"]

    def repeat(alpha, N):
        return routing_stats(logits(alpha, N)[ev], top_k, len(eval_seqs))["repeat"]

    def alpha_for(N):
        if zipf is not None or skew is None:
            return zipf if zipf is not None else 0.0
        return _bisect(lambda a: share(a, N) - skew, 0.0, 30.0, iters=30)

    def repeat_at(tau):      # repeat probability at tilt tau, with alpha refitted for the skew
        N = noise(tau)[0]
        return repeat(alpha_for(N), N)

    tau = 0.0
    achievable = (float("nan"), float("nan"))
    if locality is not None:
        achievable = (repeat_at(-1.0), repeat_at(1.0))
        tau = _bisect(lambda t: repeat_at(t) - locality, -1.0, 1.0, iters=25)
    N, Wz, fw = noise(tau)
    alpha = alpha_for(N)
    beta = -alpha * sigma * lnr
    W = np.outer(beta / mu, u) + (Vk @ (Wz / sk[:, None])).T + (R * fw).T
    return RouterFit(W.astype(np.float32), float(alpha), float(tau), rank, common_cos,
                     (rho_out, float(rho.min()), float(rho.max())), achievable)


# --------------------------------------------------------------------------------------------
# proxy simulation (no model): hidden states = common mode + AR(1) latent factors + noise
# --------------------------------------------------------------------------------------------

def proxy_hidden_states(seqs: int, length: int, hidden: int, rng: np.random.Generator,
                        factors: int = 64, common_cos: float = 0.9) -> np.ndarray:
    """Realistic router-input proxies [seqs*length, hidden]: a common-mode vector (mean cosine
    ~``common_cos``, as measured on transformer hidden states) plus ``factors`` latent AR(1)
    processes with lag-1 correlations spread over [0, 0.97] (slow context + fast token features)
    mixed by fixed random directions, plus white noise. Uses the same mixing for any call with an
    equal ``rng`` state, so fit on one draw and evaluate on a fresh draw of the sequences."""
    mix = rng.standard_normal((factors, hidden)) / math.sqrt(hidden)
    u = rng.standard_normal(hidden)
    u /= np.linalg.norm(u)
    phi = np.linspace(0.0, 0.97, factors)

    def draw(r):
        f = np.empty((seqs, length, factors))
        f[:, 0] = r.standard_normal((seqs, factors))
        for t in range(1, length):
            f[:, t] = phi * f[:, t - 1] + np.sqrt(1 - phi ** 2) * r.standard_normal((seqs, factors))
        x = f.reshape(-1, factors) @ mix + 0.3 * r.standard_normal((seqs * length, hidden)) / \
            math.sqrt(hidden)
        spread = np.linalg.norm(x, axis=1).mean()
        c = spread * common_cos / math.sqrt(1 - common_cos ** 2)
        return (x + c * u).astype(np.float32)

    return draw


def simulate(experts=60, top_k=4, hidden=256, skew=0.08, locality=0.30, sigma=2.0, seed=0,
             seqs=16, length=128) -> dict:
    """Fit a router on proxy hidden states and measure it on fresh proxies from the same process.

    Returns ``{"fit": stats on the fitting draw, "heldout": stats on a fresh draw, "alpha",
    "tau"}``.
    """
    with one_blas_thread():
        return _simulate(experts, top_k, hidden, skew, locality, sigma, seed, seqs, length)


def _simulate(experts, top_k, hidden, skew, locality, sigma, seed, seqs, length):
    rng = np.random.default_rng(seed)
    draw = proxy_hidden_states(seqs, length, hidden, rng)
    X = draw(np.random.default_rng([seed, 1]))
    fit = fit_router(X, seqs, experts, top_k, skew, locality, sigma,
                     np.random.default_rng([seed, 2]))
    Y = draw(np.random.default_rng([seed, 3]))
    return {"fit": routing_stats(X @ fit.weight.T, top_k, seqs),
            "heldout": routing_stats(Y @ fit.weight.T, top_k, seqs),
            "alpha": fit.alpha, "tau": fit.tau}

