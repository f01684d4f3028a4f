"""Numba CPU kernel for one small matrix product per attention head, ``y[h] = x[h] @ W[h].T``:
the absorbed ``kv_b_proj`` of Multi-head Latent Attention (:mod:`zipmoe_rt.models.mla`), where
each head maps its query into the latent space and its latent output to its value width.

Weights as in :mod:`zipmoe_rt.kernels.linear`: BF16 as ``uint16`` bits (widened exactly,
``bits << 16``, the fast path), float32, or float16 (widened to float32 first, exactly);
float32 accumulation. One parallel region over (head, output
row) pairs when the work is large enough (:data:`~zipmoe_rt.kernels.linear.PAR_MIN_WORK`), one
thread otherwise; the sums are the same either way.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import linear as _lin
from .linear import JIT_PARALLEL, JIT_SERIAL, weight_kind
from .widen import bf16_to_f32

__all__ = ["heads_linear"]

_KIND = {"bf16": 0, "f16": 1, "f32": 1}


@njit(inline="always")
def _row(x, W, y, r, nout, kind):
    """Output row ``o`` of head ``h`` (``r = h * nout + o``) for every token."""
    h = r // nout
    o = r - h * nout
    w = W[h, o]
    for t in range(x.shape[1]):
        xt = x[h, t]
        acc = np.float32(0.0)
        if kind == 0:
            for j in range(xt.shape[0]):
                acc += xt[j] * bf16_to_f32(w[j])
        else:
            for j in range(xt.shape[0]):
                acc += xt[j] * np.float32(w[j])
        y[h, t, o] = acc


@njit(**JIT_PARALLEL)
def _heads_par(x, W, y, kind):
    nout = W.shape[1]
    for r in prange(W.shape[0] * nout):
        _row(x, W, y, r, nout, kind)


@njit(**JIT_SERIAL)
def _heads_ser(x, W, y, kind):
    nout = W.shape[1]
    for r in range(W.shape[0] * nout):
        _row(x, W, y, r, nout, kind)


def heads_linear(x: np.ndarray, W: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``out[h] = x[h] @ W[h].T`` for every head ``h``.

    Args:
        x: float32 [nh, T, in], C-contiguous.
        W: [nh, out, in], C-contiguous: uint16 (BF16 bits), float16 or float32.
        out: optional float32 [nh, T, out] to write into.
    Returns:
        float32 [nh, T, out] (``out`` when given).
    Raises:
        TypeError: unsupported weight dtype.  ValueError: shapes disagree.
    """
    kind = _KIND[weight_kind(W)]
    nh, T, n_in = x.shape
    if W.ndim != 3 or W.shape[0] != nh or W.shape[2] != n_in:
        raise ValueError(f"heads_linear: x {x.shape} and W {W.shape} disagree")
    if out is None:
        out = np.empty((nh, T, W.shape[1]), np.float32)
    Wk = W.astype(np.float32) if W.dtype == np.float16 else W    # exact; F16 is rare here
    par = T * W.size >= _lin.PAR_MIN_WORK
    (_heads_par if par else _heads_ser)(x, Wk, out, kind)
    return out
