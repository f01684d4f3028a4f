"""Numba CPU kernel for top-k softmax routing of a sparse MoE block (``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter`` in transformers' modeling files).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["route"]


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
