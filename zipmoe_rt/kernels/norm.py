"""Numba CPU kernels for the norms (RMSNorm, LayerNorm) and the residual add of a decoder layer.

RMSNorm follows ``MixtralRMSNorm`` / ``Qwen2MoeRMSNorm`` / ``Qwen3MoeRMSNorm`` (transformers
``modeling_mixtral.py`` etc.) in float32: ``weight * (x * rsqrt(mean(x**2) + eps))``, the mean
accumulated sequentially per row. LayerNorm follows ``torch.nn.LayerNorm`` with weight and bias
(``PhimoeDecoderLayer``'s norms, ``modeling_phimoe.py``). Single-threaded (``nogil``): rows are
short.
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["rms_norm", "rms_norm_into", "layer_norm_into", "add_inplace"]

_SER = dict(nogil=True, cache=True, fastmath=True, error_model="numpy")


@njit(**_SER)
def _rmsnorm(x, w, eps, out):
    T, n = x.shape
    for t in range(T):
        s = np.float32(0.0)
        for j in range(n):
            s += x[t, j] * x[t, j]
        r = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
        for j in range(n):
            out[t, j] = w[j] * (x[t, j] * r)


@njit(**_SER)
def _add_inplace(a, b):
    for t in range(a.shape[0]):
        for j in range(a.shape[1]):
            a[t, j] += b[t, j]


def rms_norm_into(x: np.ndarray, w: np.ndarray, eps, out: np.ndarray) -> np.ndarray:
    """``out[t] = w * (x[t] / sqrt(mean(x[t]**2) + eps))`` row by row, float32.

    Args:
        x: float32 [T, n], C-contiguous.  w: float32 [n].  eps: float (taken as float32).
        out: float32 [T, n]; may not alias ``x``.
    Returns:
        ``out``.
    """
    _rmsnorm(x, w, np.float32(eps), out)
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm as ``MixtralRMSNorm``: ``weight * x / sqrt(mean(x**2) + eps)`` in float32.

    Args:
        x: float32 [T, n].  weight: float32 [n].  eps: float.
    Returns:
        float32 [T, n] (new array).
    """
    return rms_norm_into(x, weight, eps, np.empty_like(x))


def add_inplace(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a += b`` for float32 [T, n] arrays (the residual connection). Returns ``a``."""
    _add_inplace(a, b)
    return a


# -- LayerNorm (PhiMoE) --------------------------------------------------------------------------


@njit(**_SER)
def _layernorm(x, w, b, eps, out):
    T, n = x.shape
    for t in range(T):
        s = np.float32(0.0)
        for j in range(n):
            s += x[t, j]
        mean = s / np.float32(n)
        v = np.float32(0.0)
        for j in range(n):
            d = x[t, j] - mean
            v += d * d
        r = np.float32(1.0) / np.sqrt(v / np.float32(n) + eps)
        for j in range(n):
            out[t, j] = (x[t, j] - mean) * r * w[j] + b[j]


def layer_norm_into(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps,
                    out: np.ndarray) -> np.ndarray:
    """LayerNorm as ``torch.nn.LayerNorm(n, eps, elementwise_affine=True)``:
    ``out[t] = (x[t] - mean) / sqrt(var + eps) * w + b`` row by row, with the biased variance
    (divided by ``n``), float32 (two passes: the mean, then the centred squares).

    Args:
        x: float32 [T, n], C-contiguous.  w, b: float32 [n].  eps: float (taken as float32).
        out: float32 [T, n]; may not alias ``x``.
    Returns:
        ``out``.
    """
    _layernorm(x, w, b, np.float32(eps), out)
    return out
