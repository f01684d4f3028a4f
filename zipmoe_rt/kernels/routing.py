"""Numba CPU kernels for top-k softmax routing of a sparse MoE block (``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter`` in transformers' modeling files; with a choice
bias, ``Ernie4_5_MoeTopKRouter``).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["route", "route_choice_bias"]


@njit(nogil=True, cache=True)  # no fastmath: the sum order must not depend on memory layout
def _route(logits, k, renorm, idx, w):
    """Softmax over all experts (float32), top-k (descending, lowest index first on ties),
    optional renormalisation of the k weights. Compiled without fastmath so that the same
    logits always give the same weights, bit for bit (LLVM otherwise picks a vector or scalar
    summation depending on whether the scratch array aliases the input)."""
    T, E = logits.shape
    p = np.empty(E, np.float32)
    for t in range(T):
        m = logits[t, 0]
        for e in range(1, E):
            if logits[t, e] > m:
                m = logits[t, e]
        tot = np.float32(0.0)
        for e in range(E):
            p[e] = np.exp(logits[t, e] - m)
            tot += p[e]
        for e in range(E):
            p[e] = p[e] / tot
        s = np.float32(0.0)
        for j in range(k):
            best = -1
            bv = np.float32(-1.0)
            for e in range(E):
                if p[e] > bv:
                    bv = p[e]
                    best = e
            idx[t, j] = best
            w[t, j] = bv
            s += bv
            p[best] = np.float32(-2.0)
        if renorm:
            for j in range(k):
                w[t, j] = w[t, j] / s


def route(logits: np.ndarray, k: int, renorm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing as ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter``: softmax of the router
    logits in float32 over all experts, ``topk``, then (if ``renorm``) divide by the k-sum.

    Args:
        logits: float32 [T, E] router logits.  k: experts per token.  renorm: norm_topk_prob.
    Returns:
        (topk_idx int64 [T, k] in descending probability, lowest index first on ties;
        topk_w float32 [T, k]).
    """
    T = logits.shape[0]
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    _route(np.ascontiguousarray(logits, np.float32), k, renorm, idx, w)
    return idx, w


# -- ERNIE 4.5 MoE ----------------------------------------------------------------------------

@njit(nogil=True, cache=True)  # no fastmath, as _route
def _route_choice_bias(logits, k, bias, norm_min, idx, w):
    """Softmax over all experts (float32, as :func:`_route`), the k largest ``p + bias``
    (descending, lowest index first on ties), weights ``p`` divided by max(their sum,
    norm_min)."""
    T, E = logits.shape
    p = np.empty(E, np.float32)
    c = np.empty(E, np.float32)
    used = np.empty(E, np.bool_)
    for t in range(T):
        m = logits[t, 0]
        for e in range(1, E):
            if logits[t, e] > m:
                m = logits[t, e]
        tot = np.float32(0.0)
        for e in range(E):
            p[e] = np.exp(logits[t, e] - m)
            tot += p[e]
        for e in range(E):
            p[e] = p[e] / tot
            c[e] = p[e] + bias[e]
            used[e] = False
        s = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                if not used[e] and (best < 0 or c[e] > c[best]):
                    best = e
            used[best] = True
            idx[t, j] = best
            w[t, j] = p[best]
            s += p[best]
        if s < norm_min:
            s = norm_min
        for j in range(k):
            w[t, j] = w[t, j] / s


def route_choice_bias(logits: np.ndarray, k: int, bias: np.ndarray, norm_min: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing as ``Ernie4_5_MoeTopKRouter``: softmax of the router logits in float32
    over all experts ``p``, ``topk(p + bias)``, weights ``p`` of the chosen experts divided by
    ``clamp(sum, min=norm_min)``.

    Args:
        logits: float32 [T, E] router logits.  k: experts per token.
        bias: float32 [E] (or [1, E]) choice bias (``e_score_correction_bias``).
        norm_min: the clamp of the weight sum (``moe_norm_min``).
    Returns:
        (topk_idx int64 [T, k] in descending ``p + bias``, lowest index first on ties;
        topk_w float32 [T, k]).
    """
    T = logits.shape[0]
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    _route_choice_bias(np.ascontiguousarray(logits, np.float32), k,
                       np.ascontiguousarray(bias, np.float32).reshape(-1),
                       np.float32(norm_min), idx, w)
    return idx, w
