"""Numba CPU kernels of gpt-oss's expert activation and weighted scatter-add
(``GptOssExperts._apply_gate`` and the ``index_add_`` of ``GptOssExperts.forward`` in
transformers' ``modeling_gpt_oss.py``), in float32. The projections around them are the
ordinary linear kernels (:func:`zipmoe_rt.kernels.linear.linear_into`, biases included).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["clamped_swiglu", "scatter_add_weighted"]

_SER = dict(nogil=True, cache=True, error_model="numpy")


@njit(**_SER)
def _clamped_swiglu(g, u, alpha, limit, h):
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            a = g[t, i]
            if a > limit:
                a = limit
            b = u[t, i]
            if b > limit:
                b = limit
            elif b < -limit:
                b = -limit
            glu = a * (np.float32(1.0) / (np.float32(1.0) + np.exp(-(a * alpha))))
            h[t, i] = (b + np.float32(1.0)) * glu


def clamped_swiglu(g: np.ndarray, u: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    """``(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` with ``g' = min(g, limit)``,
    elementwise (``GptOssExperts._apply_gate`` after its ``[..., ::2]`` / ``[..., 1::2]``
    split).

    Args:
        g, u: float32 [T, I] (gate and up pre-activations, biases added).
        alpha, limit: the activation's constants (used as float32).
    Returns:
        float32 [T, I].
    Raises:
        ValueError: ``g`` and ``u`` of different shapes.
    """
    if g.shape != u.shape:
        raise ValueError(f"clamped_swiglu: gate {g.shape} and up {u.shape} differ")
    h = np.empty(g.shape, np.float32)
    _clamped_swiglu(g, u, np.float32(alpha), np.float32(limit), h)
    return h


@njit(**_SER)
def _scatter(out, rows, w, y):
    for r in range(rows.shape[0]):
        dst = out[rows[r]]
        wr = w[r]
        src = y[r]
        for c in range(dst.shape[0]):
            dst[c] += src[c] * wr


def scatter_add_weighted(out: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                         y: np.ndarray) -> None:
    """``out[rows[r]] += y[r] * weights[r]`` (the weighted ``index_add_``; rows distinct).

    Args:
        out: float32 [T, H], updated in place.  rows: int64 [n].  weights: float32 [n].
        y: float32 [n, H].
    """
    _scatter(out, np.ascontiguousarray(rows, np.int64),
             np.ascontiguousarray(weights, np.float32), y)
