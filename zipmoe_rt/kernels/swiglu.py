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
from .linear import JIT_PARALLEL, JIT_SERIAL, bf16_to_f32, dot_block, widen_rows_bf16, linear, linear_into

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
def _swiglu_gate_up_gemv(x, gate, up, h):
    """h[i] = silu(gate[i] . x) * (up[i] . x) for one token; rows i and i + I/2 of both
    matrices together (four sequential streams per thread)."""
    inter = gate.shape[0]
    n = gate.shape[1]
    q = inter // 2
    for i in prange(q):
        k = i + q
        g0 = np.float32(0.0)
        g1 = np.float32(0.0)
        u0 = np.float32(0.0)
        u1 = np.float32(0.0)
        gr0 = gate[i]
        gr1 = gate[k]
        ur0 = up[i]
        ur1 = up[k]
        for j in range(n):
            xj = x[j]
            g0 += bf16_to_f32(gr0[j]) * xj
            g1 += bf16_to_f32(gr1[j]) * xj
            u0 += bf16_to_f32(ur0[j]) * xj
            u1 += bf16_to_f32(ur1[j]) * xj
        h[i] = _silu(g0) * u0
        h[k] = _silu(g1) * u1
    for i in range(q * 2, inter):
        g = np.float32(0.0)
        u = np.float32(0.0)
        for j in range(n):
            g += bf16_to_f32(gate[i, j]) * x[j]
            u += bf16_to_f32(up[i, j]) * x[j]
        h[i] = _silu(g) * u


@njit(**JIT_PARALLEL)
def _swiglu_gate_up_gemm(x, gate, up, h, nthreads):
    """h[t, i] = silu(gate[i] . x[t]) * (up[i] . x[t]); each weight row widened once."""
    T = x.shape[0]
    inter, n = gate.shape
    nblocks = (inter + 1) // 2
    nchunks = max(1, min(nblocks, nthreads))
    nobias = np.zeros(0, np.float32)
    for c in prange(nchunks):
        buf = np.empty((4, n), np.float32)
        tmp = np.empty((T, 4), np.float32)
        b0 = c * nblocks // nchunks
        b1 = (c + 1) * nblocks // nchunks
        for b in range(b0, b1):
            i = b * 2
            e = min(i + 2, inter)
            nr = e - i
            widen_rows_bf16(gate, i, e, buf[0:nr])
            widen_rows_bf16(up, i, e, buf[nr:2 * nr])
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
            _swiglu_gate_up_gemv(x2[0], gate, up, h[0])
        elif T:
            _swiglu_gate_up_gemm(x2, gate, up, h, get_num_threads())
        return h
    g = linear(x2, gate, parallel=big)
    u = linear(x2, up, parallel=big)
    if act:
        return gelu_tanh_np(g) * u
    return (g / (np.float32(1.0) + np.exp(-g))) * u


@njit(**JIT_SERIAL)
def _scatter_add(out, rows, w, y):
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
    _scatter_add(out, np.ascontiguousarray(rows, dtype=np.int64),
                 np.ascontiguousarray(weights, dtype=np.float32), y)


# ---------------------------------------------------------------------------------------------
# fused k experts for one token (decode): two parallel regions per MoE layer instead of 2k


@njit(**JIT_PARALLEL)
def _experts_gemv(x, gates, ups, downs, w, out):
    """out[:] = sum_e w[e] * down_e @ (silu(gate_e @ x) * (up_e @ x)) for one token.

    gates/ups/downs are homogeneous tuples of BF16 (uint16) matrices."""
    k = len(gates)
    inter, n = gates[0].shape
    hid = downs[0].shape[0]
    h = np.empty((k, inter), np.float32)
    q = inter // 2
    for b in prange(k * q):
        e = b // q
        i = b - e * q
        m = i + q
        gate = gates[e]
        up = ups[e]
        g0 = np.float32(0.0)
        g1 = np.float32(0.0)
        u0 = np.float32(0.0)
        u1 = np.float32(0.0)
        gr0 = gate[i]
        gr1 = gate[m]
        ur0 = up[i]
        ur1 = up[m]
        for j in range(n):
            xj = x[j]
            g0 += bf16_to_f32(gr0[j]) * xj
            g1 += bf16_to_f32(gr1[j]) * xj
            u0 += bf16_to_f32(ur0[j]) * xj
            u1 += bf16_to_f32(ur1[j]) * xj
        h[e, i] = _silu(g0) * u0
        h[e, m] = _silu(g1) * u1
    for e in range(k):
        for i in range(q * 2, inter):
            g = np.float32(0.0)
            u = np.float32(0.0)
            for j in range(n):
                g += bf16_to_f32(gates[e][i, j]) * x[j]
                u += bf16_to_f32(ups[e][i, j]) * x[j]
            h[e, i] = _silu(g) * u
    qd = hid // 4
    for b in prange(qd):
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for e in range(k):
            d = downs[e]
            he = h[e]
            r0 = d[b]
            r1 = d[b + qd]
            r2 = d[b + 2 * qd]
            r3 = d[b + 3 * qd]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for j in range(inter):
                hj = he[j]
                s0 += bf16_to_f32(r0[j]) * hj
                s1 += bf16_to_f32(r1[j]) * hj
                s2 += bf16_to_f32(r2[j]) * hj
                s3 += bf16_to_f32(r3[j]) * hj
            we = w[e]
            a0 += we * s0
            a1 += we * s1
            a2 += we * s2
            a3 += we * s3
        out[b] += a0
        out[b + qd] += a1
        out[b + 2 * qd] += a2
        out[b + 3 * qd] += a3
    for o in range(qd * 4, hid):
        a = np.float32(0.0)
        for e in range(k):
            s = np.float32(0.0)
            for j in range(inter):
                s += bf16_to_f32(downs[e][o, j]) * h[e, j]
            a += w[e] * s
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
            non-BF16 or mixed array types.
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
    types = {(a.dtype, a.flags.writeable, a.flags.aligned) for a in gates + ups + downs}
    big = 3 * len(gates) * inter * hid >= _lin.PAR_MIN_WORK
    if big and len(types) == 1 and gates[0].dtype == np.uint16 and not act:
        _experts_gemv(x, gates, ups, downs, w, out)
        return
    o2, x2 = out.reshape(1, -1), x.reshape(1, -1)
    for j, (g, u, d) in enumerate(zip(gates, ups, downs)):
        expert_accumulate(o2, x2, _ROW0, w[j:j + 1], g, u, d, act)


_ROW0 = np.zeros(1, np.int64)


#: SiLU (inline) and the weighted scatter-add of :func:`expert_accumulate`, shared with the
#: packed kernels of :mod:`zipmoe_rt.kernels.packed`, which must round exactly as these do
silu = _silu
scatter_add = _scatter_add
