"""Numba CPU kernels on the compute form of resident BF16 experts (design note §6.5): the exact
inverse of the transcoder (:mod:`zipmoe_rt.kernels.transcode`, re-exported here), and the
expert kernels of :mod:`zipmoe_rt.kernels.swiglu` /
:mod:`zipmoe_rt.kernels.linear` computed from that form.

The compute form of a BF16 matrix ``[out, in]`` (:class:`zipmoe_rt.models.packed.PackedMatrix`):

* ``sm`` uint8 ``[out, in]``: the sign+mantissa plane as stored (format/SPEC.md §5.1);
* ``nib`` uint8 ``[out, (in + 1) // 2]``: per row, byte ``j`` holds the index of column ``j``
  in its low nibble and of column ``h + j`` in its high nibble (``h = (in + 1) // 2``), so both
  halves of a row decode with unit-stride loops that vectorise;
* index ``v < 15`` means exponent ``base + v``; ``15`` is an escape: the row's escapes are
  ``esc_col[esc_ptr[r]:esc_ptr[r + 1]]`` (int32 columns, ascending) with their exponents in
  ``esc_val`` (uint8).

A weight's BF16 bits are ``(sm >> 7) << 15 | exponent << 7 | (sm & 0x7F)``, the inverse of the
container's plane split; widening to float32 is ``bits << 16`` as in the BF16 kernels.

Bit-identical outputs: each kernel decodes the rows that one step of the matching BF16 kernel
reads into a per-thread scratch of at most four rows (a few KB, in L1) and then runs the BF16
kernel's own dot loop on that scratch: the same rows in the same blocks, the same loop, hence
the same float32 summation order and the same results as on the decoded matrix. The whole
BF16 matrix never exists. Same threading rules as the BF16 kernels: parallel kernels from one
thread only; the transcoder is single-threaded and ``nogil``.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from . import linear as _lin
from .linear import (JIT_PARALLEL, JIT_SERIAL, bf16_to_f32, dot_block, gemv_bf16_block,
                     gemv_bf16_row, widen_rows_bf16)
from .swiglu import scatter_add, silu
from .transcode import ESCAPE, WINDOW, pack_plane, window_base

__all__ = ["window_base", "pack_plane", "unpack_bf16", "packed_linear", "packed_linear_into",
           "packed_swiglu_hidden", "packed_expert_accumulate", "packed_experts_decode",
           "ESCAPE", "WINDOW"]


# ---------------------------------------------------------------------------------------------
# decode (the transcoder is :mod:`zipmoe_rt.kernels.transcode`)


_U16 = np.uint16


@njit(inline="always")
def _bf16_word(s, e):
    """BF16 bits from a sign+mantissa byte ``s`` and ``e = exponent << 7``, in uint16:
    ``(s & 0x80) << 8 | e | (s & 0x7F)`` as ``((s << 8 | s) & 0x807F) | e``. Every step is
    cast back to uint16 so that LLVM vectorises on 16-bit lanes (Numba widens integer
    arithmetic to 64 bits, which would run on a quarter as many lanes)."""
    return _U16(_U16(_U16(_U16(s << _U16(8)) | s) & _U16(0x807F)) | e)


@njit(inline="always")
def _unpack_row(nib, sm, b7, ep, ec, ev, r, dst):
    """dst uint16 [in] = BF16 bits of row r of a packed matrix; ``b7 = base << 7`` (uint16).

    Two unit-stride loops (low nibbles: columns ``0 .. h-1``, high nibbles: ``h .. in-1``)
    that vectorise on 16-bit lanes, then the row's escapes patched in."""
    n = dst.shape[0]
    h = (n + 1) >> 1
    nr = nib[r]
    sr = sm[r]
    m = _U16(0x780)
    for j in range(h):
        e = _U16(_U16(_U16(nr[j]) << _U16(7)) & m)
        dst[j] = _U16(_bf16_word(_U16(sr[j]), e) + b7)
    sh = sr[h:]
    dh = dst[h:]
    for j in range(n - h):
        e = _U16(_U16(_U16(nr[j]) << _U16(3)) & m)
        dh[j] = _U16(_bf16_word(_U16(sh[j]), e) + b7)
    for t in range(ep[r], ep[r + 1]):
        c = ec[t]
        dst[c] = _bf16_word(_U16(sr[c]), _U16(_U16(ev[t]) << _U16(7)))


@njit(**JIT_SERIAL)
def _unpack_all(nib, sm, b7, ep, ec, ev, out):
    for r in range(out.shape[0]):
        _unpack_row(nib, sm, b7, ep, ec, ev, r, out[r])


def unpack_bf16(P) -> np.ndarray:
    """The BF16 bits (uint16 ``[out, in]``) of a packed matrix: the exact inverse of the
    transcode, for references, tests and backends without packed kernels.

    Args:
        P: a :class:`~zipmoe_rt.models.packed.PackedMatrix`.
    Returns:
        uint16 [out, in], a new array.
    """
    out = np.empty(P.shape, np.uint16)
    _unpack_all(*_args(P), out)
    return out


# ---------------------------------------------------------------------------------------------
# linear: the GEMV / GEMM of kernels/linear.py, rows decoded into a scratch first


@njit(**JIT_PARALLEL)
def _pk_gemv_par(x, nib, sm, b7, ep, ec, ev, y, nthreads):
    """y = W @ x (one token); the blocks of ``_gemv_bf16_par`` (rows o, o+q, o+2q, o+3q)."""
    out = nib.shape[0]
    n = x.shape[0]
    q = out // 4
    nb = np.zeros(0, np.float32)
    nchunks = max(1, min(q, nthreads))
    for c in prange(nchunks):
        s = np.empty((4, n), np.uint16)
        t4 = np.empty(4, np.float32)
        for b in range(c * q // nchunks, (c + 1) * q // nchunks):
            for r in range(4):
                _unpack_row(nib, sm, b7, ep, ec, ev, b + r * q, s[r])
            gemv_bf16_block(x, s, t4, nb, 0, 1)
            for r in range(4):
                y[b + r * q] = t4[r]
    s1 = np.empty((1, n), np.uint16)
    t1 = np.empty(1, np.float32)
    for o in range(q * 4, out):
        _unpack_row(nib, sm, b7, ep, ec, ev, o, s1[0])
        gemv_bf16_row(x, s1, t1, nb, 0)
        y[o] = t1[0]


@njit(**JIT_SERIAL)
def _pk_gemv_serial(x, nib, sm, b7, ep, ec, ev, y):
    out = nib.shape[0]
    n = x.shape[0]
    q = out // 4
    nb = np.zeros(0, np.float32)
    s = np.empty((4, n), np.uint16)
    t4 = np.empty(4, np.float32)
    for b in range(q):
        for r in range(4):
            _unpack_row(nib, sm, b7, ep, ec, ev, b + r * q, s[r])
        gemv_bf16_block(x, s, t4, nb, 0, 1)
        for r in range(4):
            y[b + r * q] = t4[r]
    for o in range(q * 4, out):
        _unpack_row(nib, sm, b7, ep, ec, ev, o, s[0])
        gemv_bf16_row(x, s, t4, nb, 0)
        y[o] = t4[0]


@njit(inline="always")
def _pk_gemm_block(x, nib, sm, b7, ep, ec, ev, y, nb, o, e, s, buf):
    for r in range(o, e):
        _unpack_row(nib, sm, b7, ep, ec, ev, r, s[r - o])
    widen_rows_bf16(s, 0, e - o, buf)
    dot_block(x, buf, e - o, y, nb, o)


@njit(**JIT_PARALLEL)
def _pk_gemm_par(x, nib, sm, b7, ep, ec, ev, y, nthreads):
    """y = x @ W.T (several tokens); the chunks and 4-row blocks of ``_gemm_bf16_par``."""
    out = nib.shape[0]
    n = x.shape[1]
    nblocks = (out + 3) // 4
    nchunks = max(1, min(nblocks, nthreads))
    nb = np.zeros(0, np.float32)
    for c in prange(nchunks):
        s = np.empty((4, n), np.uint16)
        buf = np.empty((4, n), np.float32)
        for b in range(c * nblocks // nchunks, (c + 1) * nblocks // nchunks):
            o = b * 4
            _pk_gemm_block(x, nib, sm, b7, ep, ec, ev, y, nb, o, min(o + 4, out), s, buf)


@njit(**JIT_SERIAL)
def _pk_gemm_serial(x, nib, sm, b7, ep, ec, ev, y):
    out = nib.shape[0]
    n = x.shape[1]
    nb = np.zeros(0, np.float32)
    s = np.empty((4, n), np.uint16)
    buf = np.empty((4, n), np.float32)
    for o in range(0, out, 4):
        _pk_gemm_block(x, nib, sm, b7, ep, ec, ev, y, nb, o, min(o + 4, out), s, buf)


def _args(P):
    return P.nib, P.sm, _U16(P.base << 7), P.esc_ptr, P.esc_col, P.esc_val


def packed_linear_into(x: np.ndarray, P, y: np.ndarray, parallel: bool = True) -> np.ndarray:
    """``y[:] = x @ W.T`` for a packed BF16 matrix W, bit-identical to
    :func:`~zipmoe_rt.kernels.linear.linear_into` on W's BF16 bits (same kernels chosen by the
    same rule, same summation order).

    Args:
        x: float32 [T, in], C-contiguous.  P: :class:`~zipmoe_rt.models.packed.PackedMatrix`
            ``[out, in]``.  y: float32 [T, out], C-contiguous; overwritten.
        parallel: False uses the single-threaded kernels.
    Returns:
        ``y``.
    """
    out, n = P.shape
    par = parallel and x.shape[0] * out * n >= _lin.PAR_MIN_WORK and out >= 8
    a = _args(P)
    if x.shape[0] == 1:
        if par:
            _pk_gemv_par(x[0], *a, y[0], get_num_threads())
        else:
            _pk_gemv_serial(x[0], *a, y[0])
    elif par:
        _pk_gemm_par(x, *a, y, get_num_threads())
    else:
        _pk_gemm_serial(x, *a, y)
    return y


def packed_linear(x2: np.ndarray, P, parallel: bool = True) -> np.ndarray:
    """``x2 @ W.T`` as :func:`~zipmoe_rt.kernels.linear.linear` for 2-D float32 ``x2`` [T, in];
    returns float32 [T, out]. Raises ValueError when the shapes disagree."""
    if x2.ndim != 2 or x2.shape[1] != P.shape[1]:
        raise ValueError(f"packed_linear: x {x2.shape} does not match W {P.shape} ([out, in])")
    y = np.empty((x2.shape[0], P.shape[0]), np.float32)
    if x2.shape[0]:
        packed_linear_into(x2, P, y, parallel)
    return y


# ---------------------------------------------------------------------------------------------
# SwiGLU: the kernels of kernels/swiglu.py


@njit(**JIT_PARALLEL)
def _pk_swiglu_gemv(x, gn, gs, gb, gp, gc, gv, un, us, ub, up_, uc, uv, h, nthreads):
    """h[i] = silu(gate[i] . x) * (up[i] . x), rows i and i + I/2 together, as
    ``_swiglu_gate_up_gemv``."""
    inter = gn.shape[0]
    n = x.shape[0]
    q = inter // 2
    nchunks = max(1, min(q, nthreads))
    for c in prange(nchunks):
        s = np.empty((4, n), np.uint16)
        for i in range(c * q // nchunks, (c + 1) * q // nchunks):
            k = i + q
            _unpack_row(gn, gs, gb, gp, gc, gv, i, s[0])
            _unpack_row(gn, gs, gb, gp, gc, gv, k, s[1])
            _unpack_row(un, us, ub, up_, uc, uv, i, s[2])
            _unpack_row(un, us, ub, up_, uc, uv, k, s[3])
            g0 = np.float32(0.0)
            g1 = np.float32(0.0)
            u0 = np.float32(0.0)
            u1 = np.float32(0.0)
            gr0 = s[0]
            gr1 = s[1]
            ur0 = s[2]
            ur1 = s[3]
            for j in range(n):
                xj = x[j]
                g0 += bf16_to_f32(gr0[j]) * xj
                g1 += bf16_to_f32(gr1[j]) * xj
                u0 += bf16_to_f32(ur0[j]) * xj
                u1 += bf16_to_f32(ur1[j]) * xj
            h[i] = silu(g0) * u0
            h[k] = silu(g1) * u1
    s2 = np.empty((2, n), np.uint16)
    for i in range(q * 2, inter):
        _unpack_row(gn, gs, gb, gp, gc, gv, i, s2[0])
        _unpack_row(un, us, ub, up_, uc, uv, i, s2[1])
        g = np.float32(0.0)
        u = np.float32(0.0)
        for j in range(n):
            g += bf16_to_f32(s2[0, j]) * x[j]
            u += bf16_to_f32(s2[1, j]) * x[j]
        h[i] = silu(g) * u


@njit(**JIT_PARALLEL)
def _pk_swiglu_gemm(x, gn, gs, gb, gp, gc, gv, un, us, ub, up_, uc, uv, h, nthreads):
    """h[t, i] = silu(gate[i] . x[t]) * (up[i] . x[t]), as ``_swiglu_gate_up_gemm``."""
    T = x.shape[0]
    inter = gn.shape[0]
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
            for r in range(nr):
                _unpack_row(gn, gs, gb, gp, gc, gv, i + r, s[r])
                _unpack_row(un, us, ub, up_, uc, uv, i + r, s[nr + r])
            widen_rows_bf16(s, 0, 2 * nr, buf)
            dot_block(x, buf, 2 * nr, tmp, nobias, 0)
            for t in range(T):
                for r in range(nr):
                    h[t, i + r] = silu(tmp[t, r]) * tmp[t, nr + r]


def packed_swiglu_hidden(x2: np.ndarray, G, U) -> np.ndarray:
    """``silu(x2 @ gate.T) * (x2 @ up.T)`` from packed gate and up, bit-identical to
    :func:`~zipmoe_rt.kernels.swiglu.swiglu_hidden` on their BF16 bits.

    Args:
        x2: float32 [T, H], C-contiguous.  G, U: packed [I, H].
    Returns:
        float32 [T, I].
    """
    T = x2.shape[0]
    big = 2 * T * G.shape[0] * G.shape[1] >= _lin.PAR_MIN_WORK
    if big:
        h = np.empty((T, G.shape[0]), np.float32)
        if T == 1:
            _pk_swiglu_gemv(x2[0], *_args(G), *_args(U), h[0], get_num_threads())
        elif T:
            _pk_swiglu_gemm(x2, *_args(G), *_args(U), h, get_num_threads())
        return h
    g = packed_linear(x2, G, parallel=big)
    u = packed_linear(x2, U, parallel=big)
    return (g / (np.float32(1.0) + np.exp(-g))) * u


def _check(where, x_cols, E):
    inter, hid = E.gate.shape
    if E.up.shape != (inter, hid) or E.down.shape != (hid, inter) or x_cols != hid:
        raise ValueError(f"{where}: x [.., {x_cols}], gate {E.gate.shape}, up {E.up.shape}, "
                         f"down {E.down.shape} disagree")


def packed_expert_accumulate(out: np.ndarray, x: np.ndarray, rows: np.ndarray,
                             weights: np.ndarray, E) -> None:
    """``out[rows[i]] += weights[i] * expert(x[rows[i]])`` for a packed expert, bit-identical
    to :func:`~zipmoe_rt.kernels.swiglu.expert_accumulate` on its BF16 bits
    (``MixtralExperts.forward``'s loop body).

    Args:
        out: float32 [T, H], updated in place.  x: float32 [T, H].  rows: int64 [n] distinct
            token indices.  weights: float32 [n].
        E: :class:`~zipmoe_rt.models.packed.PackedExpert` (gate, up [I, H], down [H, I]).
    Raises:
        ValueError: shapes disagree.
    """
    xs = x if rows.shape[0] == x.shape[0] == 1 else np.ascontiguousarray(x[rows])
    _check("packed_expert_accumulate", xs.shape[1], E)
    h = packed_swiglu_hidden(xs, E.gate, E.up)
    y = np.empty((h.shape[0], E.down.shape[0]), np.float32)
    packed_linear_into(h, E.down, y)
    scatter_add(out, np.ascontiguousarray(rows, dtype=np.int64),
                 np.ascontiguousarray(weights, dtype=np.float32), y)


# ---------------------------------------------------------------------------------------------
# k experts of one token: the two parallel regions of ``_experts_gemv``


@njit(**JIT_PARALLEL)
def _pk_experts_gemv(x, gn, gs, gb, gp, gc, gv, un, us, ub, up_, uc, uv,
                     dn, ds, db, dp, dc, dv, w, out, nthreads):
    """out[:] += sum_e w[e] * down_e @ (silu(gate_e @ x) * (up_e @ x)); each argument group is
    a packed matrix per expert (homogeneous tuples; ``base << 7`` as uint16 [k])."""
    k = len(gn)
    inter = gn[0].shape[0]
    n = x.shape[0]
    hid = dn[0].shape[0]
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
            _unpack_row(gn[e], gs[e], gb[e], gp[e], gc[e], gv[e], i, s[0])
            _unpack_row(gn[e], gs[e], gb[e], gp[e], gc[e], gv[e], m, s[1])
            _unpack_row(un[e], us[e], ub[e], up_[e], uc[e], uv[e], i, s[2])
            _unpack_row(un[e], us[e], ub[e], up_[e], uc[e], uv[e], m, s[3])
            g0 = np.float32(0.0)
            g1 = np.float32(0.0)
            u0 = np.float32(0.0)
            u1 = np.float32(0.0)
            gr0 = s[0]
            gr1 = s[1]
            ur0 = s[2]
            ur1 = s[3]
            for j in range(n):
                xj = x[j]
                g0 += bf16_to_f32(gr0[j]) * xj
                g1 += bf16_to_f32(gr1[j]) * xj
                u0 += bf16_to_f32(ur0[j]) * xj
                u1 += bf16_to_f32(ur1[j]) * xj
            h[e, i] = silu(g0) * u0
            h[e, m] = silu(g1) * u1
    s2 = np.empty((2, n), np.uint16)
    for e in range(k):
        for i in range(q * 2, inter):
            _unpack_row(gn[e], gs[e], gb[e], gp[e], gc[e], gv[e], i, s2[0])
            _unpack_row(un[e], us[e], ub[e], up_[e], uc[e], uv[e], i, s2[1])
            g = np.float32(0.0)
            u = np.float32(0.0)
            for j in range(n):
                g += bf16_to_f32(s2[0, j]) * x[j]
                u += bf16_to_f32(s2[1, j]) * x[j]
            h[e, i] = silu(g) * u
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
                he = h[e]
                for r in range(4):
                    _unpack_row(dn[e], ds[e], db[e], dp[e], dc[e], dv[e], b + r * qd, s[r])
                r0 = s[0]
                r1 = s[1]
                r2 = s[2]
                r3 = s[3]
                s0 = np.float32(0.0)
                s1 = np.float32(0.0)
                s2_ = np.float32(0.0)
                s3 = np.float32(0.0)
                for j in range(inter):
                    hj = he[j]
                    s0 += bf16_to_f32(r0[j]) * hj
                    s1 += bf16_to_f32(r1[j]) * hj
                    s2_ += bf16_to_f32(r2[j]) * hj
                    s3 += bf16_to_f32(r3[j]) * hj
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
            _unpack_row(dn[e], ds[e], db[e], dp[e], dc[e], dv[e], o, s1r[0])
            sacc = np.float32(0.0)
            for j in range(inter):
                sacc += bf16_to_f32(s1r[0, j]) * h[e, j]
            a += w[e] * sacc
        out[o] += a


def _group(mats):
    return (tuple(m.nib for m in mats), tuple(m.sm for m in mats),
            np.array([m.base << 7 for m in mats], np.uint16), tuple(m.esc_ptr for m in mats),
            tuple(m.esc_col for m in mats), tuple(m.esc_val for m in mats))


_ROW0 = np.zeros(1, np.int64)


def packed_experts_decode(out: np.ndarray, x: np.ndarray, experts, weights: np.ndarray) -> None:
    """``out += sum_e weights[e] * expert_e(x)`` for ONE token and k packed experts,
    bit-identical to :func:`~zipmoe_rt.kernels.swiglu.experts_decode` on their BF16 bits (the
    same two parallel regions when the work is big, else one expert at a time).

    Args:
        out: float32 [H], updated in place.  x: float32 [H].
        experts: sequence of k :class:`~zipmoe_rt.models.packed.PackedExpert` of one shape.
        weights: float32 [k] routing weights.
    Raises:
        ValueError: shapes disagree.
    """
    w = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
    inter, hid = experts[0].gate.shape
    if x.shape != (hid,) or out.shape != (hid,) or len(w) != len(experts):
        raise ValueError("packed_experts_decode: shapes disagree")
    for E in experts:
        _check("packed_experts_decode", hid, E)
        if E.gate.shape != (inter, hid):
            raise ValueError("packed_experts_decode: experts of different shapes")
    if 3 * len(experts) * inter * hid >= _lin.PAR_MIN_WORK:
        _pk_experts_gemv(x, *_group([E.gate for E in experts]), *_group([E.up for E in experts]),
                         *_group([E.down for E in experts]), w, out, get_num_threads())
        return
    o2, x2 = out.reshape(1, -1), x.reshape(1, -1)
    for j, E in enumerate(experts):
        packed_expert_accumulate(o2, x2, _ROW0, w[j:j + 1], E)
