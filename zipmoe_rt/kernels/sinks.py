"""Causal (optionally sliding-window) grouped-query softmax attention with attention sinks, on
the Numba attention kernel of :mod:`zipmoe_rt.kernels.attention`: a learned logit per query
head that joins the softmax denominator and has no value (``GptOssAttention`` in transformers' ``modeling_gpt_oss.py``, ``eager_attention_forward``:
the sink is concatenated to the scores, the softmax runs over both, the sink's column is
dropped).

Layouts as :mod:`zipmoe_rt.kernels.attention`: ``qkv`` float32 [T, (nq + 2 nkv) * hd] (only q
is read), caches ``kc``, ``vc`` float32 [nkv, capacity, hd], token ``t`` at position
``pos0 + t``.
"""
from __future__ import annotations

import numpy as np

from .attention import ATTN_PAR_MIN, attention_par, attention_ser

__all__ = ["attention_sinks"]


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
    attend = attention_par if T * nq * keys * hd >= ATTN_PAR_MIN else attention_ser
    attend(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out)
    return out
