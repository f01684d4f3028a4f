"""Numba CPU kernel of causal (optionally sliding-window) grouped-query softmax attention with
attention sinks: a learned logit per query head that joins the softmax denominator and has no
value (``GptOssAttention`` in transformers' ``modeling_gpt_oss.py``, ``eager_attention_forward``:
the sink is concatenated to the scores, the softmax runs over both, the sink's column is
dropped).

Layouts as :mod:`zipmoe_rt.kernels.attention`: ``qkv`` float32 [T, (nq + 2 nkv) * hd] (only q
is read), caches ``kc``, ``vc`` float32 [nkv, capacity, hd], token ``t`` at position
``pos0 + t``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .attention import ATTN_PAR_MIN

__all__ = ["attention_sinks"]

_PAR = dict(parallel=True, nogil=True, cache=True, fastmath=True, error_model="numpy")
_SER = dict(nogil=True, cache=True, fastmath=True, error_model="numpy")


@njit(inline="always")
def _attend_sink(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
    """Attention of one (token, head) pair ``th`` with the head's sink in the denominator."""
    group = nq // nkv
    t = th // nq
    h = th - t * nq
    kh = h // group
    p = pos0 + t
    start = 0
    if window > 0 and p - window + 1 > 0:
        start = p - window + 1
    n = p + 1 - start
    sc = np.empty(n, np.float32)
    q = qkv[t, h * hd:(h + 1) * hd]
    sink = sinks[h]
    m = sink
    for j in range(n):
        kr = kc[kh, start + j]
        acc = np.float32(0.0)
        for d in range(hd):
            acc += q[d] * kr[d]
        acc *= scale
        sc[j] = acc
        if acc > m:
            m = acc
    tot = np.float32(0.0)
    for j in range(n):
        e = np.exp(sc[j] - m)
        sc[j] = e
        tot += e
    tot += np.exp(sink - m)
    inv = np.float32(1.0) / tot
    o = out[t, h * hd:(h + 1) * hd]
    for d in range(hd):
        o[d] = 0.0
    for j in range(n):
        wj = sc[j] * inv
        vr = vc[kh, start + j]
        for d in range(hd):
            o[d] += wj * vr[d]


@njit(**_PAR)
def _sinks_par(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
    for th in prange(qkv.shape[0] * nq):
        _attend_sink(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out)


@njit(**_SER)
def _sinks_ser(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
    for th in range(qkv.shape[0] * nq):
        _attend_sink(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out)


def attention_sinks(qkv: np.ndarray, nq: int, nkv: int, hd: int, kc: np.ndarray,
                    vc: np.ndarray, pos0: int, window: int, scale: np.float32,
                    sinks: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[t, h] = sum_j p_j v[j]``, ``p_j = exp(s_j - m) / (sum_i exp(s_i - m) +
    exp(sinks[h] - m))`` over the visible keys ``j`` of query position ``p = pos0 + t`` (``j <=
    p``, and ``j > p - window`` when ``window > 0``), ``s_j = q[t, h] . k[j] * scale``, ``m`` the
    largest of the scores and the sink. One thread below
    :data:`~zipmoe_rt.kernels.attention.ATTN_PAR_MIN` units of work, else parallel over (token,
    head) pairs (same results).

    Args:
        qkv: float32 [T, (nq + 2 nkv) * hd] (only q is read).  nq, nkv, hd: heads, head size.
        kc, vc: float32 [nkv, capacity, hd], positions ``< pos0 + T`` valid.
        pos0: first position.  window: tokens, 0 = full.  scale: np.float32.
        sinks: float32 [nq], C-contiguous.  out: float32 [T, nq * hd], overwritten.
    Returns:
        ``out``. Shapes are not checked here (the backend op does).
    """
    T = qkv.shape[0]
    keys = pos0 + T if window <= 0 else min(pos0 + T, window)
    attend = _sinks_par if T * nq * keys * hd >= ATTN_PAR_MIN else _sinks_ser
    attend(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out)
    return out
