"""The expert kernels on the compute form of resident BF16 experts (design note §6.5): the
exact inverse of the transcoder (:mod:`zipmoe_rt.kernels.transcode`, re-exported here), and
the entry points of ``--resident compressed`` and of the C tier, which run the BF16 kernels of
:mod:`zipmoe_rt.kernels.linear` / :mod:`zipmoe_rt.kernels.swiglu` on a packed row source
(:mod:`zipmoe_rt.kernels.rows`).

The compute form of a BF16 matrix ``[out, in]`` (:class:`zipmoe_rt.models.packed.PackedMatrix`):

* ``sm`` uint8 ``[out, in]``: the sign+mantissa plane as stored (format/SPEC.md §5.1);
* ``nib`` uint8 ``[out, (in + 1) // 2]``: per row, byte ``j`` holds the index of column ``j``
  in its low nibble and of column ``h + j`` in its high nibble (``h = (in + 1) // 2``), so both
  halves of a row decode with unit-stride loops that vectorise;
* index ``v < 15`` means exponent ``base + v``; ``15`` is an escape: the row's escapes are
  ``esc_col[esc_ptr[r]:esc_ptr[r + 1]]`` (int32 columns, ascending) with their exponents in
  ``esc_val`` (uint8).

Bit-identical outputs: the kernels are the BF16 kernels themselves, compiled for a row source
that decodes each row a step reads into a per-thread scratch of at most four rows (a few KB,
in L1) before the step's dot loop runs over it: the same rows in the same blocks, the same
loop, hence the same float32 summation order and the same results as on the decoded matrix.
The whole BF16 matrix never exists. Same threading rules as the BF16 kernels: parallel kernels
from one thread only; the transcoder is single-threaded and ``nogil``.
"""
from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit

from . import linear as _lin
from . import swiglu as _sw
from .linear import JIT_SERIAL
from .rows import k_sources, packed_source, unpack_row
from ..models.packed import is_packed
from ..models.weights import ExpertWeights
from .transcode import ESCAPE, WINDOW, pack_plane, window_base
from .widen import bf16_to_f32

__all__ = ["window_base", "pack_plane", "unpack_bf16", "packed_linear", "packed_linear_into",
           "packed_swiglu_hidden", "packed_expert_accumulate", "packed_experts_decode", "packed_rows",
           "ESCAPE", "WINDOW"]


@njit(**JIT_SERIAL)
def _unpack_all(nib, sm, b7, ep, ec, ev, out):
    for r in range(out.shape[0]):
        unpack_row(nib, sm, b7, ep, ec, ev, r, out[r])


def _args(P):
    return packed_source(P)


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
# linear: the GEMV / GEMM of kernels/linear.py on a packed row source

_NO_BIAS = np.zeros(0, np.float32)


def packed_linear_into(x: np.ndarray, P, y: np.ndarray, parallel: bool = True,
                       bias: np.ndarray | None = None) -> np.ndarray:
    """``y[:] = x @ W.T (+ bias)`` for a packed BF16 matrix W, bit-identical to
    :func:`~zipmoe_rt.kernels.linear.linear_into` on W's BF16 bits (the same kernels, chosen by
    the same rule).

    Args:
        x: float32 [T, in], C-contiguous.  P: :class:`~zipmoe_rt.models.packed.PackedMatrix`
            ``[out, in]``.  y: float32 [T, out], C-contiguous; overwritten.
        parallel: False uses the single-threaded kernels.
        bias: optional float32 [out], added in the kernels as ``linear_into`` adds it.
    Returns:
        ``y``.
    """
    out, n = P.shape
    b = _NO_BIAS if bias is None else bias
    par = parallel and x.shape[0] * out * n >= _lin.PAR_MIN_WORK and out >= 8
    src = _args(P)
    if x.shape[0] == 1:
        if par:
            _lin.gemv_bf16_par(x[0], src, y[0], b, get_num_threads())
        else:
            _lin.gemv_bf16_serial(x[0], src, y[0], b)
    elif par:
        _lin.gemm_bf16_par(x, src, y, b, get_num_threads())
    else:
        _lin.gemm_bf16_serial(x, src, y, b)
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


@njit(**JIT_SERIAL)
def _rows_packed(nib, sm, b7, ep, ec, ev, ids, buf, out):
    for i in range(ids.shape[0]):
        unpack_row(nib, sm, b7, ep, ec, ev, ids[i], buf)
        o = out[i]
        for j in range(buf.shape[0]):
            o[j] = bf16_to_f32(buf[j])


def packed_rows(P, ids: np.ndarray) -> np.ndarray:
    """Rows ``W[ids]`` of a packed BF16 matrix widened to float32 (the embedding lookup of a
    head tied to the embedding, held in the compute form), bit-identical to
    :func:`~zipmoe_rt.kernels.embed.bf16_rows` on W's BF16 bits: each gathered row is decoded
    (:func:`~zipmoe_rt.kernels.rows.unpack_row`), then widened exactly.

    Args:
        P: :class:`~zipmoe_rt.models.packed.PackedMatrix` ``[V, H]``.  ids: int64 [T].
    Returns:
        float32 [T, H].
    Raises:
        IndexError: an id outside [0, V).
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    V, H = P.shape
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise IndexError(f"token id out of range [0, {V})")
    out = np.empty((ids.shape[0], H), np.float32)
    _rows_packed(*_args(P), ids, np.empty(H, np.uint16), out)
    return out


# ---------------------------------------------------------------------------------------------
# SwiGLU: the kernels of kernels/swiglu.py on packed row sources


def packed_swiglu_hidden(x2: np.ndarray, G, U, act: int = 0) -> np.ndarray:
    """``silu(x2 @ gate.T) * (x2 @ up.T)`` from packed gate and up (GELU-tanh in place of SiLU
    with ``act`` 1, never fused), bit-identical to
    :func:`~zipmoe_rt.kernels.swiglu.swiglu_hidden` on their BF16 bits.

    Args:
        x2: float32 [T, H], C-contiguous.  G, U: packed [I, H].  act: 0 SiLU, 1 GELU-tanh.
    Returns:
        float32 [T, I].
    """
    T = x2.shape[0]
    big = 2 * T * G.shape[0] * G.shape[1] >= _lin.PAR_MIN_WORK
    if big and not act:
        h = np.empty((T, G.shape[0]), np.float32)
        if T == 1:
            _sw.swiglu_gate_up_gemv(x2[0], _args(G), _args(U), h[0], get_num_threads())
        elif T:
            _sw.swiglu_gate_up_gemm(x2, _args(G), _args(U), h, get_num_threads())
        return h
    g = packed_linear(x2, G, parallel=big)
    u = packed_linear(x2, U, parallel=big)
    if act:
        return _sw.gelu_tanh_np(g) * u
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
    _sw.scatter_add(out, np.ascontiguousarray(rows, dtype=np.int64),
                 np.ascontiguousarray(weights, dtype=np.float32), y)


# ---------------------------------------------------------------------------------------------
# k experts of one token: the two parallel regions of ``swiglu.experts_gemv``


def _sources(experts, inter, hid):
    """The 21 matrix arguments of ``swiglu.experts_gemv`` for ``experts`` (gate, up, down
    through :func:`~zipmoe_rt.kernels.rows.k_sources`), or None when a BF16 matrix is not
    uint16 (then the experts run one at a time, as in ``swiglu.experts_decode``)."""
    if any(a.dtype != np.uint16 for E in experts if not is_packed(E)
           for a in (E.gate, E.up, E.down)):
        return None
    args = []
    for role, cols in (("gate", hid), ("up", hid), ("down", inter)):
        args += k_sources([getattr(E, role) for E in experts], cols)
    return args


def packed_experts_decode(out: np.ndarray, x: np.ndarray, experts, weights: np.ndarray) -> None:
    """``out += sum_e weights[e] * expert_e(x)`` for ONE token and k experts, each packed
    (:class:`~zipmoe_rt.models.packed.PackedExpert`) or BF16
    (:class:`~zipmoe_rt.models.weights.ExpertWeights`), bit-identical to
    :func:`~zipmoe_rt.kernels.swiglu.experts_decode` on their BF16 bits: the same two parallel
    regions when the work is big, else one expert at a time.

    Args:
        out: float32 [H], updated in place.  x: float32 [H].
        experts: sequence of k experts of one shape (ExpertWeights, (gate, up, down) triples
            or PackedExpert).
        weights: float32 [k] routing weights.
    Raises:
        ValueError: shapes disagree.
    """
    w = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
    experts = [E if is_packed(E) else ExpertWeights(*(np.ascontiguousarray(a) for a in (
        (E[0], E[1], E[2]) if isinstance(E, tuple) else (E.gate, E.up, E.down))))
        for E in experts]
    inter, hid = experts[0].gate.shape
    if x.shape != (hid,) or out.shape != (hid,) or len(w) != len(experts):
        raise ValueError("packed_experts_decode: shapes disagree")
    for E in experts:
        _check("packed_experts_decode", hid, E)
        if E.gate.shape != (inter, hid):
            raise ValueError("packed_experts_decode: experts of different shapes")
    srcs = None
    if 3 * len(experts) * inter * hid >= _lin.PAR_MIN_WORK:
        srcs = _sources(experts, inter, hid)
    if srcs is not None:
        _sw.experts_gemv(x, *srcs, w, out, inter, get_num_threads())
        return
    o2, x2 = out.reshape(1, -1), x.reshape(1, -1)
    for j, E in enumerate(experts):
        if is_packed(E):
            packed_expert_accumulate(o2, x2, _ROW0, w[j:j + 1], E)
        else:
            _sw.expert_accumulate(o2, x2, _ROW0, w[j:j + 1], E.gate, E.up, E.down)


_ROW0 = np.zeros(1, np.int64)
