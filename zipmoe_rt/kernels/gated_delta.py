"""Numba CPU kernels of the Gated DeltaNet layer (Qwen3-Next, Qwen3.5-MoE): the causal
depthwise conv1d with its state + SiLU, the gated delta rule (a chunked scan for a prompt, the
recurrence for one token), and the gated RMSNorm.

They follow the eager fallbacks of transformers' ``models/qwen3_next/modeling_qwen3_next.py``
(``torch_chunk_gated_delta_rule``, ``torch_recurrent_gated_delta_rule``,
``Qwen3NextRMSNormGated``) and ``models/mamba/modeling_mamba.py`` (``causal_conv1d_fn`` /
``causal_conv1d_update``), in float32 with float32 states, every inner loop over contiguous
rows. The delta rule runs one value head per iteration of a parallel loop; every kernel
releases the GIL (``nogil``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["conv1d_silu", "gated_delta_rule", "rmsnorm_gated"]

_SER = dict(nogil=True, cache=True, error_model="numpy")
_PAR = dict(nogil=True, cache=True, error_model="numpy", parallel=True, fastmath=True)
#: the epsilon of the L2 norm of q and k (transformers' ``l2norm``).
L2_EPS = np.float32(1e-6)
#: tokens per chunk of the chunked scan (``torch_chunk_gated_delta_rule``'s ``chunk_size``).
CHUNK = 64


@njit(**_SER)
def _conv1d_silu(x, w, state, new_state, y, b, act):
    T, C = x.shape
    K = w.shape[1]
    P = K - 1
    biased = b.shape[0] > 0
    for t in range(T):
        for c in range(C):
            s = np.float32(0.0)
            for j in range(K):
                p = t + j               # index into concat(state, x)
                v = state[p, c] if p < P else x[p - P, c]
                s += w[c, j] * v
            if biased:
                s += b[c]
            y[t, c] = s / (np.float32(1.0) + np.exp(-s)) if act else s
    for p in range(P):
        src = T + p                     # the last P rows of concat(state, x)
        for c in range(C):
            new_state[p, c] = state[src, c] if src < P else x[src - P, c]


def conv1d_silu(x, w, state, new_state, silu=True, bias=None):
    """``y[t, c] = silu(sum_j w[c, j] * ext[t + j, c] + bias[c])``, ``ext = concat(state, x)``
    (without the SiLU when ``silu`` is False, without the bias when None); ``new_state`` gets
    the last ``K - 1`` rows of ``ext``.

    Args: x float32 [T, C]; w float32 [C, K]; state, new_state float32 [K - 1, C] (distinct);
        bias None or float32 [C].
    Returns: float32 [T, C].
    """
    y = np.empty(x.shape, np.float32)
    b = np.zeros(0, np.float32) if bias is None else bias
    _conv1d_silu(x, w, state, new_state, y, b, bool(silu))
    return y


@njit(**_SER)
def _softplus(x):
    return x if x > np.float32(20.0) else np.float32(np.log1p(np.exp(x)))


@njit(**_SER)
def _l2norm_scaled(src, dst, scale):
    s = np.float32(0.0)
    for i in range(src.shape[0]):
        s += src[i] * src[i]
    r = np.float32(scale / np.sqrt(s + L2_EPS))
    for i in range(src.shape[0]):
        dst[i] = src[i] * r


@njit(**_PAR)
def _gdr(qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state, out, chunk):
    T = qkv.shape[0]
    r = nv // nk
    qscale = np.float32(1.0 / np.sqrt(np.float64(dk)))
    one = np.float32(1.0)
    for h in prange(nv):
        kh = h // r
        S = new_state[h]                # [dk, dv], updated in place from the old state
        S[:, :] = state[h]
        A = -np.exp(np.float32(A_log[h]))
        q = np.empty((T, dk), np.float32)
        k = np.empty((T, dk), np.float32)
        v = np.empty((T, dv), np.float32)
        g = np.empty(T, np.float32)
        beta = np.empty(T, np.float32)
        for t in range(T):
            _l2norm_scaled(qkv[t, kh * dk:(kh + 1) * dk], q[t], qscale)
            _l2norm_scaled(qkv[t, (nk + kh) * dk:(nk + kh + 1) * dk], k[t], one)
            v[t] = qkv[t, 2 * nk * dk + h * dv:2 * nk * dk + (h + 1) * dv]
            beta[t] = one / (one + np.exp(-ba[t, h]))
            g[t] = A * _softplus(ba[t, nv + h] + dt_bias[h])
        if T == 1:                      # torch_recurrent_gated_delta_rule
            d = np.exp(g[0])
            m = np.zeros(dv, np.float32)
            for i in range(dk):         # S *= exp(g); m = S^T k
                ki, Si = k[0, i], S[i]
                for j in range(dv):
                    Si[j] *= d
                    m[j] += Si[j] * ki
            for j in range(dv):
                m[j] = (v[0, j] - m[j]) * beta[0]       # delta
            o = np.zeros(dv, np.float32)
            for i in range(dk):         # S += k (x) delta; o = S^T q
                ki, qi, Si = k[0, i], q[0, i], S[i]
                for j in range(dv):
                    Si[j] += ki * m[j]
                    o[j] += Si[j] * qi
            out[0, h * dv:(h + 1) * dv] = o
            continue
        for c0 in range(0, T, chunk):   # torch_chunk_gated_delta_rule
            c = min(T, c0 + chunk) - c0
            G = np.empty(c, np.float32)
            acc = np.float32(0.0)
            for i in range(c):
                acc += g[c0 + i]
                G[i] = acc
            # X = (I + strict_lower(kb k^T * decay))^-1 [vb | kb * exp(G)]
            X = np.empty((c, dv + dk), np.float32)
            for i in range(c):
                b = beta[c0 + i]
                for j in range(dv):
                    X[i, j] = v[c0 + i, j] * b
                eg = np.exp(G[i])
                for j in range(dk):
                    X[i, dv + j] = k[c0 + i, j] * b * eg
                Xi, ki = X[i], k[c0 + i]
                for m in range(i):
                    km, Xm = k[c0 + m], X[m]
                    a = np.float32(0.0)
                    for j in range(dk):
                        a += ki[j] * km[j]
                    a *= b * np.exp(G[i] - G[m])
                    for j in range(dv + dk):
                        Xi[j] -= a * Xm[j]
            # v_new = U - W S
            vn = np.empty((c, dv), np.float32)
            for i in range(c):
                vi, Xi = vn[i], X[i]
                for j in range(dv):
                    vi[j] = Xi[j]
                for m in range(dk):
                    w, Sm = Xi[dv + m], S[m]
                    for j in range(dv):
                        vi[j] -= w * Sm[j]
            # o_i = (q_i exp(G_i)) S + sum_{m <= i} (q_i . k_m) exp(G_i - G_m) vn_m
            o = np.empty(dv, np.float32)
            for i in range(c):
                eg = np.exp(G[i])
                o[:] = 0.0
                qi = q[c0 + i]
                for m in range(dk):
                    qm, Sm = qi[m] * eg, S[m]
                    for j in range(dv):
                        o[j] += qm * Sm[j]
                for m in range(i + 1):
                    km, vm = k[c0 + m], vn[m]
                    a = np.float32(0.0)
                    for j in range(dk):
                        a += qi[j] * km[j]
                    a *= np.exp(G[i] - G[m])
                    for j in range(dv):
                        o[j] += a * vm[j]
                out[c0 + i, h * dv:(h + 1) * dv] = o
            # S = S exp(G_last) + sum_m (k_m exp(G_last - G_m)) (x) vn_m
            last = G[c - 1]
            el = np.exp(last)
            for i in range(dk):
                Si = S[i]
                for j in range(dv):
                    Si[j] *= el
            for m in range(c):
                e = np.exp(last - G[m])
                km, vm = k[c0 + m], vn[m]
                for i in range(dk):
                    kmi, Si = km[i] * e, S[i]
                    for j in range(dv):
                        Si[j] += kmi * vm[j]


def gated_delta_rule(qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state, chunk=CHUNK):
    """See :meth:`~zipmoe_rt.backends.base.Backend.gated_delta_rule`: float32 [T, nv * dv];
    ``new_state`` [nv, dk, dv] written (one token: the recurrence; several: the chunked scan)."""
    out = np.empty((qkv.shape[0], nv * dv), np.float32)
    _gdr(qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state, out, chunk)
    return out


@njit(**_SER)
def _rmsnorm_gated(x, w, z, eps, out):
    R, n = x.shape
    for t in range(R):
        s = np.float32(0.0)
        for j in range(n):
            s += x[t, j] * x[t, j]
        r = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
        for j in range(n):
            zz = z[t, j]
            out[t, j] = (w[j] * (x[t, j] * r)) * (zz / (np.float32(1.0) + np.exp(-zz)))


def rmsnorm_gated(x, w, z, eps, out=None):
    """``w * rmsnorm(x) * silu(z)`` per row (``Qwen3NextRMSNormGated``), float32 [R, n]."""
    if out is None:
        out = np.empty(x.shape, np.float32)
    _rmsnorm_gated(x, w, z, np.float32(eps), out)
    return out
