"""Numba CPU kernels of SwiGLU experts on BF16 weights read in place: the hidden activation
``silu(x @ gate.T) * (x @ up.T)``, one expert applied to the tokens routed to it, and the k
experts of one token fused into two parallel regions (decode). With ``act`` 1 (GELU-tanh in
place of SiLU: Gemma 4's ``gelu_pytorch_tanh`` experts and MLP, index 1 of
:data:`zipmoe_rt.backends.base.ACTIVATIONS`) the gate and up projections go through the
parallel :func:`~zipmoe_rt.kernels.linear.linear` kernels and the activation through NumPy
(:func:`gelu_tanh_np`), so the fused SiLU kernels stay as they are.

They follow ``MixtralExperts`` / ``Qwen2MoeMLP`` (transformers ``modeling_mixtral.py``,
``modeling_qwen2_moe.py``) in float32, and share the widening and blocked-dot helpers of
:mod:`zipmoe_rt.kernels.linear` (same threading rules: parallel kernels from one thread only).
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from . import linear as _lin
from .linear import (JIT_PARALLEL, JIT_SERIAL, dot1_bf16, dot4_bf16, dot_block, linear,
                     linear_into)
from .rows import k_sources, row_k, row_of
from .widen import widen_rows_bf16

__all__ = ["swiglu_expert", "swiglu_hidden", "expert_accumulate", "experts_decode"]


# ---------------------------------------------------------------------------------------------
# fused SwiGLU expert (BF16)


@njit(inline="always")
def _silu(g):
    return g / (np.float32(1.0) + np.exp(-g))


#: GELU-tanh constants as ATen's GeluKernel spells them: sqrt(2) * (2 / sqrt(pi)) / 2, 0.044715
_GELU_BETA = np.float32(0.7978845608028654)
_GELU_KAPPA = np.float32(0.044715)


def gelu_tanh_np(g: np.ndarray) -> np.ndarray:
    """``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))`` over a float32 array
    (``nn.GELU(approximate="tanh")``, transformers' ``gelu_pytorch_tanh``), float32."""
    inner = _GELU_BETA * (g + _GELU_KAPPA * (g * g * g))
    return (np.float32(0.5) * g * (np.float32(1.0) + np.tanh(inner))).astype(np.float32)


@njit(**JIT_PARALLEL)
def swiglu_gate_up_gemv(x, gate, up, h, nthreads):
    """h[i] = silu(gate[i] . x) * (up[i] . x) for one token; rows i and i + I/2 of both
    matrices together (four sequential streams per thread). gate, up: any row source of
    :mod:`zipmoe_rt.kernels.rows`."""
    inter = h.shape[0]
    n = x.shape[0]
    q = inter // 2
    nchunks = max(1, min(q, nthreads))
    for c in prange(nchunks):
        s = np.empty((4, n), np.uint16)
        for i in range(c * q // nchunks, (c + 1) * q // nchunks):
            k = i + q
            g0, g1, u0, u1 = dot4_bf16(x, row_of(gate, i, s[0]), row_of(gate, k, s[1]),
                                       row_of(up, i, s[2]), row_of(up, k, s[3]))
            h[i] = _silu(g0) * u0
            h[k] = _silu(g1) * u1
    s2 = np.empty((2, n), np.uint16)
    for i in range(q * 2, inter):
        h[i] = _silu(dot1_bf16(x, row_of(gate, i, s2[0]))) * dot1_bf16(x, row_of(up, i, s2[1]))


@njit(**JIT_PARALLEL)
def swiglu_gate_up_gemm(x, gate, up, h, nthreads):
    """h[t, i] = silu(gate[i] . x[t]) * (up[i] . x[t]); each weight row widened once."""
    T = x.shape[0]
    inter = h.shape[1]
    n = x.shape[1]
    nblocks = (inter + 1) // 2
    nchunks = max(1, min(nblocks, nthreads))
    nobias = np.zeros(0, np.float32)
    for c in prange(nchunks):
        buf = np.empty((4, n), np.float32)
        tmp = np.empty((T, 4), np.float32)
        s = np.empty((4, n), np.uint16)
        b0 = c * nblocks // nchunks
        b1 = (c + 1) * nblocks // nchunks
        for b in range(b0, b1):
            i = b * 2
            e = min(i + 2, inter)
            nr = e - i
            widen_rows_bf16(gate, i, e, buf[0:nr], s)
            widen_rows_bf16(up, i, e, buf[nr:2 * nr], s[2:])
            dot_block(x, buf, 2 * nr, tmp, nobias, 0)
            for t in range(T):
                for r in range(nr):
                    h[t, i + r] = _silu(tmp[t, r]) * tmp[t, nr + r]


def swiglu_expert(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray,
                  act: int = 0) -> np.ndarray:
    """One SwiGLU expert ``down @ (silu(gate @ x) * (up @ x))`` per token, float32 accumulation.

    Follows ``MixtralExperts`` / ``Qwen2MoeMLP`` (transformers ``modeling_mixtral.py``,
    ``modeling_qwen2_moe.py``): ``act_fn(gate) * up`` then ``down_proj``.

    Args:
        x: float32 [T, H] (or [H]).
        gate, up: [I, H]; down: [H, I]. BF16 bits (uint16) take the fused path; float16/float32
            go through :func:`linear`.
        act: the gate activation (0 SiLU, 1 GELU-tanh).
    Returns:
        float32 [T, H] (or [H] for 1-D x).
    Raises:
        ValueError: shapes disagree.  TypeError: unsupported dtype.
    """
    x = np.asarray(x, dtype=np.float32)
    one = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if one else x)
    inter, hid = gate.shape
    if up.shape != gate.shape or down.shape != (hid, inter) or x2.shape[1] != hid:
        raise ValueError(f"swiglu_expert: x {x.shape}, gate {gate.shape}, up {up.shape}, "
                         f"down {down.shape} disagree")
    h = swiglu_hidden(x2, gate, up, act)
    y = linear(h, down)
    return y[0] if one else y


def swiglu_hidden(x2: np.ndarray, gate: np.ndarray, up: np.ndarray, act: int = 0) -> np.ndarray:
    """``silu(x2 @ gate.T) * (x2 @ up.T)``: the hidden activation of a SwiGLU MLP (GELU-tanh in
    place of SiLU with ``act`` 1, never fused).

    Args:
        x2: float32 [T, H], C-contiguous.  gate, up: [I, H] (BF16 bits fused; else via linear).
        act: the gate activation (0 SiLU, 1 GELU-tanh).
    Returns:
        float32 [T, I].
    """
    T = x2.shape[0]
    big = 2 * T * gate.shape[0] * gate.shape[1] >= _lin.PAR_MIN_WORK
    if big and gate.dtype == np.uint16 and up.dtype == np.uint16 and not act:
        h = np.empty((T, gate.shape[0]), np.float32)
        if T == 1:
            swiglu_gate_up_gemv(x2[0], gate, up, h[0], get_num_threads())
        elif T:
            swiglu_gate_up_gemm(x2, gate, up, h, get_num_threads())
        return h
    g = linear(x2, gate, parallel=big)
    u = linear(x2, up, parallel=big)
    if act:
        return gelu_tanh_np(g) * u
    return (g / (np.float32(1.0) + np.exp(-g))) * u


@njit(**JIT_SERIAL)
def scatter_add(out, rows, w, y):
    """``out[rows[i]] += w[i] * y[i]`` in float32, row by row in order: the weighted
    scatter-add of :func:`expert_accumulate`, shared with
    :func:`zipmoe_rt.kernels.packed.packed_expert_accumulate`, which must round exactly as it
    does.

    Args:
        out: float32 ``[T, hidden]``, updated.  rows: int64 ``[m]`` token rows.
        w: float32 ``[m]`` routing weights.  y: float32 ``[m, hidden]`` expert outputs.
    """
    for i in range(rows.shape[0]):
        r = rows[i]
        wi = w[i]
        o = out[r]
        yi = y[i]
        for j in range(o.shape[0]):
            o[j] += wi * yi[j]


def expert_accumulate(out: np.ndarray, x: np.ndarray, rows: np.ndarray, weights: np.ndarray,
                      gate: np.ndarray, up: np.ndarray, down: np.ndarray, act: int = 0) -> None:
    """``out[rows[i]] += weights[i] * expert(x[rows[i]])``: one expert applied to the tokens
    routed to it, as the loop body of ``MixtralExperts.forward`` (``index_add_`` of the
    weighted expert output).

    Args:
        out: float32 [T, H], updated in place.
        x: float32 [T, H].
        rows: int64 [n] token indices (distinct).
        weights: float32 [n] routing weights.
        gate, up: [I, H]; down: [H, I] (BF16 bits, float16 or float32).
        act: the gate activation (0 SiLU, 1 GELU-tanh).
    Raises:
        ValueError / TypeError: as :func:`swiglu_expert`.
    """
    if rows.shape[0] == x.shape[0] == 1:
        xs = x
    else:
        xs = np.ascontiguousarray(x[rows])
    inter, hid = gate.shape
    if up.shape != gate.shape or down.shape != (hid, inter) or xs.shape[1] != hid:
        raise ValueError(f"expert_accumulate: x {x.shape}, gate {gate.shape}, up {up.shape}, "
                         f"down {down.shape} disagree")
    h = swiglu_hidden(xs, gate, up, act)
    y = np.empty((h.shape[0], hid), np.float32)
    linear_into(h, down, y)
    scatter_add(out, np.ascontiguousarray(rows, dtype=np.int64),
                 np.ascontiguousarray(weights, dtype=np.float32), y)


# ---------------------------------------------------------------------------------------------
# fused k experts for one token (decode): two parallel regions per MoE layer instead of 2k


@njit(**JIT_PARALLEL)
def experts_gemv(x, gW, gN, gS, gB, gP, gC, gV, uW, uN, uS, uB, uP, uC, uV,
                  dW, dN, dS, dB, dP, dC, dV, w, out, inter, nthreads):
    """out[:] += sum_e w[e] * down_e @ (silu(gate_e @ x) * (up_e @ x)) for one token.

    The k gate, up and down matrices come as the seven component arguments of
    :func:`~zipmoe_rt.kernels.rows.row_k` each (``g*``, ``u*``, ``d*``; from
    :func:`~zipmoe_rt.kernels.rows.k_sources`): BF16 bits, compute forms, or a mix, all
    through one compiled kernel per k; ``inter``: the experts' intermediate size I."""
    k = w.shape[0]
    n = x.shape[0]
    hid = out.shape[0]
    h = np.empty((k, inter), np.float32)
    q = inter // 2
    nblk = k * q
    nchunks = max(1, min(nblk, nthreads))
    for c in prange(nchunks):
        s = np.empty((4, n), np.uint16)
        for b in range(c * nblk // nchunks, (c + 1) * nblk // nchunks):
            e = b // q
            i = b - e * q
            m = i + q
            g0, g1, u0, u1 = dot4_bf16(x, row_k(gW, gN, gS, gB, gP, gC, gV, e, i, s[0]),
                                       row_k(gW, gN, gS, gB, gP, gC, gV, e, m, s[1]),
                                       row_k(uW, uN, uS, uB, uP, uC, uV, e, i, s[2]),
                                       row_k(uW, uN, uS, uB, uP, uC, uV, e, m, s[3]))
            h[e, i] = _silu(g0) * u0
            h[e, m] = _silu(g1) * u1
    s2 = np.empty((2, n), np.uint16)
    for e in range(k):
        for i in range(q * 2, inter):
            h[e, i] = (_silu(dot1_bf16(x, row_k(gW, gN, gS, gB, gP, gC, gV, e, i, s2[0])))
                       * dot1_bf16(x, row_k(uW, uN, uS, uB, uP, uC, uV, e, i, s2[1])))
    qd = hid // 4
    dchunks = max(1, min(qd, nthreads))
    for c in prange(dchunks):
        s = np.empty((4, inter), np.uint16)
        for b in range(c * qd // dchunks, (c + 1) * qd // dchunks):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for e in range(k):
                s0, s1, s2_, s3 = dot4_bf16(h[e], row_k(dW, dN, dS, dB, dP, dC, dV, e, b, s[0]),
                                            row_k(dW, dN, dS, dB, dP, dC, dV, e, b + qd, s[1]),
                                            row_k(dW, dN, dS, dB, dP, dC, dV, e, b + 2 * qd, s[2]),
                                            row_k(dW, dN, dS, dB, dP, dC, dV, e, b + 3 * qd, s[3]))
                we = w[e]
                a0 += we * s0
                a1 += we * s1
                a2 += we * s2_
                a3 += we * s3
            out[b] += a0
            out[b + qd] += a1
            out[b + 2 * qd] += a2
            out[b + 3 * qd] += a3
    s1r = np.empty((1, inter), np.uint16)
    for o in range(qd * 4, hid):
        a = np.float32(0.0)
        for e in range(k):
            a += w[e] * dot1_bf16(h[e], row_k(dW, dN, dS, dB, dP, dC, dV, e, o, s1r[0]))
        out[o] += a


def experts_decode(out: np.ndarray, x: np.ndarray, experts, weights: np.ndarray,
                   act: int = 0) -> None:
    """``out += sum_e weights[e] * expert_e(x)`` for ONE token and k experts in two parallel
    regions (decode path of ``MixtralExperts.forward``; the per-expert partial sums are combined
    in float32).

    Args:
        out: float32 [H], updated in place.
        x: float32 [H].
        experts: sequence of k :class:`~zipmoe_rt.models.weights.ExpertWeights` (or
            (gate [I,H], up [I,H], down [H,I]) triples), all BF16 (uint16) of one shape.
        weights: float32 [k] routing weights.
        act: the gate activation (0 SiLU; 1 GELU-tanh, one expert at a time).
    Raises:
        ValueError: shapes disagree.  Falls back to :func:`expert_accumulate` per expert for
            non-BF16 weights or small products.
    """
    gates = tuple(np.ascontiguousarray(e[0] if isinstance(e, tuple) else e.gate) for e in experts)
    ups = tuple(np.ascontiguousarray(e[1] if isinstance(e, tuple) else e.up) for e in experts)
    downs = tuple(np.ascontiguousarray(e[2] if isinstance(e, tuple) else e.down) for e in experts)
    w = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
    inter, hid = gates[0].shape
    if (x.shape != (hid,) or out.shape != (hid,) or len(w) != len(gates)
            or any(g.shape != (inter, hid) or u.shape != (inter, hid) or d.shape != (hid, inter)
                   for g, u, d in zip(gates, ups, downs))):
        raise ValueError("experts_decode: shapes disagree")
    big = 3 * len(gates) * inter * hid >= _lin.PAR_MIN_WORK
    if big and not act and all(a.dtype == np.uint16 for a in gates + ups + downs):
        experts_gemv(x, *k_sources(gates, hid), *k_sources(ups, hid), *k_sources(downs, inter),
                      w, out, inter, get_num_threads())
        return
    o2, x2 = out.reshape(1, -1), x.reshape(1, -1)
    for j, (g, u, d) in enumerate(zip(gates, ups, downs)):
        expert_accumulate(o2, x2, _ROW0, w[j:j + 1], g, u, d, act)


_ROW0 = np.zeros(1, np.int64)

