"""The Gated DeltaNet ops written once over an array module ``xp`` (NumPy for the reference
backend, CuPy for the CUDA backend): the causal depthwise conv1d with its state, the gated delta
rule (a chunked scan for several tokens, the recurrence for one) and the gated RMSNorm.

They follow the eager fallbacks of transformers' ``models/qwen3_next/modeling_qwen3_next.py``
(``causal_conv1d_update`` / ``causal_conv1d_fn``, ``torch_chunk_gated_delta_rule``,
``torch_recurrent_gated_delta_rule``, ``Qwen3NextRMSNormGated``), in float32, vectorised over
the value heads. See :class:`~zipmoe_rt.backends.base.Backend` for the contracts.
"""
from __future__ import annotations

import numpy as np

from .checks import check_gated_delta

_F32 = np.float32
#: the epsilon of ``l2norm`` on q and k inside the gated delta rule (transformers' ``l2norm``).
L2_EPS = 1e-6
#: tokens per chunk of the chunked scan (``torch_chunk_gated_delta_rule``'s ``chunk_size``).
CHUNK = 64


def silu(xp, x):
    """``x * sigmoid(x)``, float32."""
    return x / (_F32(1.0) + xp.exp(-x))


def conv1d_silu(xp, x, w, state, new_state, silu=True, bias=None):
    """Causal depthwise conv1d over the channels of ``x`` after the ``K - 1`` inputs held in
    ``state``, plus ``bias`` when given, then SiLU unless ``silu`` is False; ``new_state``
    receives the last ``K - 1`` inputs.

    Args: x float32 [T, C]; w float32 [C, K]; state, new_state float32 [K - 1, C];
        bias None or float32 [C].
    Returns: float32 [T, C].
    """
    T = x.shape[0]
    K = w.shape[1]
    ext = xp.concatenate([state, x], axis=0)             # [K - 1 + T, C]
    y = xp.zeros(x.shape, dtype=_F32)
    for j in range(K):
        y += ext[j:j + T] * w[:, j]
    new_state[...] = ext[T:]
    if bias is not None:
        y += bias
    return y / (_F32(1.0) + xp.exp(-y)) if silu else y      # silu(xp, y)


def _softplus(xp, x):
    """``F.softplus`` (beta 1, threshold 20), float32."""
    return xp.where(x > _F32(20.0), x, xp.log1p(xp.exp(xp.minimum(x, _F32(20.0))))).astype(_F32)


def _l2norm(xp, x):
    """``x * rsqrt(sum(x**2) + 1e-6)`` over the last axis, float32."""
    return x / xp.sqrt((x * x).sum(axis=-1, keepdims=True) + _F32(L2_EPS))


def gated_delta_rule(xp, qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state,
                     chunk=CHUNK):
    """See :meth:`~zipmoe_rt.backends.base.Backend.gated_delta_rule`. Returns float32
    [T, nv * dv]."""
    T = qkv.shape[0]
    r = nv // nk
    q = qkv[:, :nk * dk].reshape(T, nk, dk)
    k = qkv[:, nk * dk:2 * nk * dk].reshape(T, nk, dk)
    v = qkv[:, 2 * nk * dk:].reshape(T, nv, dv)
    beta = _F32(1.0) / (_F32(1.0) + xp.exp(-ba[:, :nv]))                  # [T, nv]
    g = -xp.exp(A_log.astype(_F32)) * _softplus(xp, ba[:, nv:] + dt_bias)  # [T, nv]
    if r > 1:
        q, k = xp.repeat(q, r, axis=1), xp.repeat(k, r, axis=1)
    q, k, v = (xp.ascontiguousarray(a.transpose(1, 0, 2)) for a in (q, k, v))   # [nv, T, d]
    beta, g = xp.ascontiguousarray(beta.T), xp.ascontiguousarray(g.T)           # [nv, T]
    q = _l2norm(xp, q) * _F32(dk ** -0.5)
    k = _l2norm(xp, k)
    S = state.astype(_F32, copy=True)                                            # [nv, dk, dv]
    out = xp.empty((nv, T, dv), dtype=_F32)
    if T == 1:
        S *= xp.exp(g[:, 0])[:, None, None]
        kv_mem = (S * k[:, 0, :, None]).sum(axis=1)                              # [nv, dv]
        delta = (v[:, 0] - kv_mem) * beta[:, 0, None]
        S += k[:, 0, :, None] * delta[:, None, :]
        out[:, 0] = (S * q[:, 0, :, None]).sum(axis=1)
    else:
        for c0 in range(0, T, chunk):
            c1 = min(T, c0 + chunk)
            out[:, c0:c1] = _chunk(xp, q[:, c0:c1], k[:, c0:c1], v[:, c0:c1],
                                   g[:, c0:c1], beta[:, c0:c1], S)
    new_state[...] = S
    return xp.ascontiguousarray(out.transpose(1, 0, 2)).reshape(T, nv * dv)


def _chunk(xp, q, k, v, g, beta, S):
    """One chunk of ``torch_chunk_gated_delta_rule`` (q scaled and normalised, k normalised;
    [nv, c, d]); updates ``S`` [nv, dk, dv] in place and returns the chunk's output
    [nv, c, dv]."""
    c = q.shape[1]
    G = xp.cumsum(g, axis=1)                                         # [nv, c], decreasing
    lower = xp.tril(xp.ones((c, c), dtype=_F32))
    # exp(G_i - G_j) for j <= i (<= 0 there: g <= 0), 0 above the diagonal
    decay = xp.exp(xp.minimum(G[:, :, None] - G[:, None, :], _F32(0.0))) * lower
    kb = k * beta[:, :, None]
    vb = v * beta[:, :, None]
    A = xp.matmul(kb, k.transpose(0, 2, 1)) * decay                 # [nv, c, c]
    rhs = xp.concatenate([vb, kb * xp.exp(G)[:, :, None]], axis=2)  # [nv, c, dv + dk]
    X = rhs.copy()
    for i in range(1, c):                         # unit lower-triangular solve, row by row
        X[:, i] -= xp.matmul(A[:, i:i + 1, :i], X[:, :i])[:, 0]
    dv = v.shape[2]
    U, W = X[:, :, :dv], X[:, :, dv:]
    v_new = U - xp.matmul(W, S)                                      # [nv, c, dv]
    attn = xp.matmul(q, k.transpose(0, 2, 1)) * decay                # [nv, c, c]
    o = xp.matmul(q * xp.exp(G)[:, :, None], S) + xp.matmul(attn, v_new)
    last = G[:, -1:]                                                 # [nv, 1]
    kd = k * xp.exp(last - G)[:, :, None]
    S *= xp.exp(last)[:, :, None]
    S += xp.matmul(kd.transpose(0, 2, 1), v_new)
    return o


def rmsnorm_gated(xp, x, w, z, eps):
    """``w * rmsnorm(x) * silu(z)`` per row (``Qwen3NextRMSNormGated``), float32 [R, n]."""
    var = (x * x).mean(axis=-1, keepdims=True, dtype=_F32)
    return (w * (x / xp.sqrt(var + _F32(eps)))) * silu(xp, z)


class LinearAttnOps:
    """The backend methods of the Qwen3-Next / Qwen3.5-MoE ops (contracts in
    :class:`~zipmoe_rt.backends.base.Backend`) over the array module :attr:`XP`: a mixin of the
    NumPy reference backend (``XP`` NumPy) and of the CUDA backend (``XP`` CuPy)."""

    #: the array module the ops run on
    XP = np

    def sigmoid_mul_(self, x, g):
        """``x *= sigmoid(g)`` (``attn_output * torch.sigmoid(gate)``), elementwise float32."""
        x *= _F32(1.0) / (_F32(1.0) + self.XP.exp(-g))
        return x

    def conv1d_silu(self, x, w, state, new_state, silu=True, bias=None):
        """:func:`conv1d_silu` over :attr:`XP`."""
        return conv1d_silu(self.XP, x, w, state, new_state, silu, bias)

    def gated_delta_rule(self, qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state):
        """:func:`gated_delta_rule` over :attr:`XP` (chunked scan for several tokens, the
        recurrence for one), its shapes checked first."""
        check_gated_delta(qkv, ba, state, nk, nv, dk, dv)
        return gated_delta_rule(self.XP, qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state,
                                new_state)

    def rmsnorm_gated(self, x, w, z, eps, out=None):
        """:func:`rmsnorm_gated` over :attr:`XP`, into ``out`` when given."""
        y = rmsnorm_gated(self.XP, x, w, z, eps)
        if out is None:
            return y
        out[...] = y
        return out
