"""gpt-oss's two ops on the GPU (``modeling_gpt_oss.py``), as plain CuPy array code: attention
with a sink logit per head in the softmax denominator (``eager_attention_forward`` with
``s_aux``) and one biased expert with the clamped SwiGLU (``GptOssExperts``), its projections
through the backend's own ``linear`` (GEMV kernel for few tokens, cuBLAS else). They read as
:class:`~zipmoe_rt.backends.numpy_ref.NumpyBackend`'s versions do.

Imported by :mod:`zipmoe_rt.backends.cupy_cuda` only (it imports CuPy).
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from .base import check_sinks

_F32 = np.float32
#: query tokens per step of :func:`attention_sinks` (bounds its score matrices: kv heads x
#: group x step x keys float32 values)
SINK_QUERY_STEP = 256


def attention_sinks(be, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
    """:meth:`Backend.attention_sinks <zipmoe_rt.backends.base.Backend.attention_sinks>` on
    CuPy arrays, batched over the heads of each kv group and :data:`SINK_QUERY_STEP` query
    tokens at a time: masked scores, the row maximum taken with the sink, the sink's
    exponential added to the denominator, times the values.

    Args:
        be: the :class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`.  Others: as the op.
    Returns:
        ``out``.
    Raises:
        ValueError: ``sinks`` not of ``nq`` values.
    """
    check_sinks(sinks, nq)
    T = qkv.shape[0]
    g = nq // nkv
    sk = cp.asarray(sinks, cp.float32).reshape(nkv, g, 1, 1)
    for t0 in range(0, T, SINK_QUERY_STEP):
        t1 = min(T, t0 + SINK_QUERY_STEP)
        n = pos0 + t1                                   # keys these queries may see
        q = qkv[t0:t1, :nq * hd].reshape(t1 - t0, nkv, g, hd).transpose(1, 2, 0, 3)
        K, V = kc[:, :n], vc[:, :n]
        s = cp.matmul(q.reshape(nkv, g * (t1 - t0), hd), K.transpose(0, 2, 1))
        s = s.reshape(nkv, g, t1 - t0, n) * _F32(scale)
        qpos = cp.arange(pos0 + t0, pos0 + t1)[:, None]
        kpos = cp.arange(n)[None, :]
        vis = kpos <= qpos
        if window > 0:
            vis &= kpos > qpos - window
        s = cp.where(vis, s, _F32(-np.inf))
        m = cp.maximum(s.max(axis=-1, keepdims=True), sk)
        p = cp.exp(s - m)
        p /= p.sum(axis=-1, keepdims=True) + cp.exp(sk - m)
        o = cp.matmul(p.reshape(nkv, g * (t1 - t0), n), V)
        out[t0:t1] = o.reshape(nkv, g, t1 - t0, hd).transpose(2, 0, 1, 3).reshape(
            t1 - t0, nq * hd)
    return out


def _f32(a):
    """A bias as a float32 CuPy array (uploaded when on the host; BF16 bits widened)."""
    a = a if isinstance(a, cp.ndarray) else cp.asarray(np.ascontiguousarray(a))
    if a.dtype == cp.uint16:
        return (a.astype(cp.uint32) << 16).view(cp.float32)
    return cp.ascontiguousarray(a, cp.float32)


def clamped_expert(be, x, e, glu):
    """``GptOssExperts`` for one expert: gate and up through ``be.linear`` with their biases,
    ``(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g')`` with ``g' = min(g, limit)``,
    down with its bias.

    Args:
        be: the :class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`.  x: float32 [T, H] CuPy.
        e: :class:`~zipmoe_rt.models.weights.ExpertWeights` with biases (host arrays are
            uploaded).  glu: :class:`~zipmoe_rt.backends.base.ClampedSwiGLU`.
    Returns:
        float32 [T, H] CuPy array.
    """
    w = e.map(lambda a: a if isinstance(a, cp.ndarray) else cp.asarray(np.ascontiguousarray(a)))
    lim = _F32(glu.limit)
    g = cp.minimum(be.linear(x, w.gate, _f32(w.gate_bias)), lim)
    u = cp.clip(be.linear(x, w.up, _f32(w.up_bias)), -lim, lim)
    h = (u + _F32(1.0)) * (g * (_F32(1.0) / (_F32(1.0) + cp.exp(-(g * _F32(glu.alpha))))))
    return be.linear(h, w.down, _f32(w.down_bias))
