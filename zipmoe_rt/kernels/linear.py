"""Numba CPU kernels for the dense algebra of a decoder: ``y = x @ W.T (+ bias)`` on BF16 weights
read in place, and embedding rows widened on the fly. The fused SwiGLU expert kernels built on
these live in :mod:`zipmoe_rt.kernels.swiglu`.

Weights arrive the way :mod:`zipmoe_rt.models.weights` hands them out: ``[out, in]`` like
``torch.nn.Linear.weight``, BF16 as ``uint16`` bit patterns (the fast path), FP16 as ``float16``
or FP32 as ``float32``. Activations are ``float32``; every dot product accumulates in float32.
Widening BF16 is exact (``float32 bits = bf16 bits << 16``), so results match a float32
reference up to summation order (transformers' ``nn.functional.linear`` on the up-cast weights).

Layout of the work:

* ``T == 1`` (decode): a GEMV that streams each weight once, four rows per ``prange`` step so a
  loaded ``x[j]`` feeds four FMAs; the loop is vectorised by LLVM (zero-extend, shift, FMA). The
  four rows lie a quarter of the matrix apart: four sequential streams per thread keep more
  memory requests in flight (DRAM read rate on 2 cores here: 15 GB/s with one stream per
  thread, 19-20 GB/s with four).
* k experts of one token (:func:`~zipmoe_rt.kernels.swiglu.experts_decode`): gate/up of all k
  experts in one parallel region, the weighted down projections in a second.
* ``T > 1`` (prefill): rows are split into one chunk per thread; each block of four rows is
  widened once into a small float32 scratch (L1-resident) and reused for all ``T`` tokens, so a
  weight is widened once per call, not ``T`` times.

The BF16 GEMV and GEMM read weight rows through :func:`~zipmoe_rt.kernels.rows.row_of`, so
Numba compiles them both for BF16 matrices (rows read in place) and for matrices in the compute
form of :mod:`zipmoe_rt.kernels.packed` (rows decoded into an L1 scratch), with the same dot
loops and hence the same results.

All kernels are ``@njit(nogil=True, cache=True, fastmath=True)``; the big ones are
``parallel=True`` and use Numba's default threading layer. Call parallel kernels from one thread
only (the model's main thread); ``parallel=False`` selects single-threaded kernels, safe from
worker threads. Small products run single-threaded anyway (see ``PAR_MIN_WORK``; the threshold
is higher when OpenMP workers sleep, :mod:`zipmoe_rt.kernels`).
"""
from __future__ import annotations

import os

import numpy as np
from numba import get_num_threads, njit, prange

from .rows import row_of
from .widen import bf16_to_f32, f16_to_f32, widen_rows_bf16

__all__ = ["linear", "linear_into", "weight_kind"]

#: Numba options of the parallel kernels (shared by the kernel modules of this package).
JIT_PARALLEL = dict(parallel=True, nogil=True, cache=True, fastmath=True, error_model="numpy")
#: Numba options of the single-threaded kernels.
JIT_SERIAL = dict(nogil=True, cache=True, fastmath=True, error_model="numpy")

#: rows handled together by one step of the kernels (shares each x load between four rows).
_RB = 4


def par_min_work(policy: str | None = None) -> int:
    """:data:`PAR_MIN_WORK` for a wait policy (``"ACTIVE"``: 2**17, else 2**20; default: the
    environment's ``OMP_WAIT_POLICY``), or ``ZIPMOE_PAR_MIN_WORK`` when that is set."""
    p = (policy or os.environ.get("OMP_WAIT_POLICY", "")).upper()
    return int(os.environ.get("ZIPMOE_PAR_MIN_WORK", 0)) or (1 << 17 if p == "ACTIVE" else 1 << 20)


#: below this many multiply-adds (T x out x in) one thread beats a parallel region, whose
#: fork/join costs ~2 us with spinning OpenMP workers but ~75 us with sleeping ones in a VM
#: (see :mod:`zipmoe_rt.kernels`). Follows the wait policy (:func:`par_min_work`, set again by
#: :func:`zipmoe_rt.kernels.set_wait_policy`); read at every call.
PAR_MIN_WORK = par_min_work()

_NO_BIAS = np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# rows widened into a float32 scratch (FP16, FP32 weights of the GEMM)


@njit(**JIT_SERIAL)
def _widen_rows_f16(W, r0, r1, buf):
    n = W.shape[1]
    for r in range(r0, r1):
        row = W[r]
        b = buf[r - r0]
        for j in range(n):
            b[j] = f16_to_f32(row[j])


@njit(**JIT_SERIAL)
def _copy_rows_f32(W, r0, r1, buf):
    n = W.shape[1]
    for r in range(r0, r1):
        row = W[r]
        b = buf[r - r0]
        for j in range(n):
            b[j] = row[j]


# ---------------------------------------------------------------------------------------------
# BF16 GEMV (T == 1), on any row source (kernels/rows.py: BF16 bits in place, or decoded)


@njit(inline="always")
def dot4_bf16(x, r0, r1, r2, r3):
    """The dot products of four BF16 rows (uint16 ``[n]``) with float32 ``x`` ``[n]``: one
    loaded ``x[j]`` feeds four FMAs. The one dot loop of every four-row GEMV step (plain,
    SwiGLU gate/up, experts' down), whatever the rows' source."""
    n = x.shape[0]
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for j in range(n):
        xj = x[j]
        a0 += bf16_to_f32(r0[j]) * xj
        a1 += bf16_to_f32(r1[j]) * xj
        a2 += bf16_to_f32(r2[j]) * xj
        a3 += bf16_to_f32(r3[j]) * xj
    return a0, a1, a2, a3


@njit(inline="always")
def dot1_bf16(x, r0):
    """The dot product of one BF16 row with ``x`` (the tails of the four-row steps)."""
    n = x.shape[0]
    acc = np.float32(0.0)
    for j in range(n):
        acc += bf16_to_f32(r0[j]) * x[j]
    return acc


@njit(inline="always")
def _gemv_block(x, W, y, bias, o, q, s):
    """Rows o, o+q, o+2q, o+3q: four far-apart sequential streams per thread keep more memory
    requests in flight than one (measured here: 15 -> 19 GB/s on 2 cores). ``s``: uint16
    ``[4, in]`` scratch for rows that must be decoded."""
    a0, a1, a2, a3 = dot4_bf16(x, row_of(W, o, s[0]), row_of(W, o + q, s[1]),
                               row_of(W, o + 2 * q, s[2]), row_of(W, o + 3 * q, s[3]))
    if bias.size:
        a0 += bias[o]
        a1 += bias[o + q]
        a2 += bias[o + 2 * q]
        a3 += bias[o + 3 * q]
    y[o] = a0
    y[o + q] = a1
    y[o + 2 * q] = a2
    y[o + 3 * q] = a3


@njit(inline="always")
def _gemv_row(x, W, y, bias, o, s):
    acc = dot1_bf16(x, row_of(W, o, s[0]))
    if bias.size:
        acc += bias[o]
    y[o] = acc


@njit(**JIT_PARALLEL)
def gemv_bf16_par(x, W, y, bias, nthreads):
    """y = W @ x (+ bias) for one token: one chunk of four-row blocks per thread (each with its
    scratch). Also run by :mod:`zipmoe_rt.kernels.packed` on the compute form.

    Args:
        x: float32 ``[n]``.  W: ``[out, n]`` BF16 weights, any row source of
            :mod:`zipmoe_rt.kernels.rows`.  y: float32 ``[out]``, written.
        bias: float32 ``[out]``, or an empty array for none.  nthreads: threads to split over.
    """
    out = y.shape[0]
    n = x.shape[0]
    q = out // 4
    nchunks = max(1, min(q, nthreads))
    for c in prange(nchunks):
        s = np.empty((4, n), np.uint16)
        for b in range(c * q // nchunks, (c + 1) * q // nchunks):
            _gemv_block(x, W, y, bias, b, q, s)
    s1 = np.empty((1, n), np.uint16)
    for o in range(q * 4, out):
        _gemv_row(x, W, y, bias, o, s1)


@njit(**JIT_SERIAL)
def gemv_bf16_serial(x, W, y, bias):
    """:func:`gemv_bf16_par` on one thread (same arguments but ``nthreads``, same sums in the
    same order per row)."""
    out = y.shape[0]
    n = x.shape[0]
    q = out // 4
    s = np.empty((4, n), np.uint16)
    for b in range(q):
        _gemv_block(x, W, y, bias, b, q, s)
    for o in range(q * 4, out):
        _gemv_row(x, W, y, bias, o, s)


# ---------------------------------------------------------------------------------------------
# blocked GEMM (any T) over a float32 scratch of widened rows


@njit(inline="always")
def dot_block(x, buf, nr, y, bias, o):
    """y[t, o:o+nr] = buf[:nr] @ x[t] (+ bias) for every t; buf holds float32 rows."""
    T = x.shape[0]
    n = x.shape[1]
    if nr == 4:
        b0 = buf[0]
        b1 = buf[1]
        b2 = buf[2]
        b3 = buf[3]
        T2 = T - T % 2
        for t in range(0, T2, 2):  # 4 rows x 2 tokens: 8 accumulators, 6 loads per 8 FMAs
            xt = x[t]
            xu = x[t + 1]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            c0 = np.float32(0.0)
            c1 = np.float32(0.0)
            c2 = np.float32(0.0)
            c3 = np.float32(0.0)
            for j in range(n):
                xj = xt[j]
                xk = xu[j]
                a0 += b0[j] * xj
                a1 += b1[j] * xj
                a2 += b2[j] * xj
                a3 += b3[j] * xj
                c0 += b0[j] * xk
                c1 += b1[j] * xk
                c2 += b2[j] * xk
                c3 += b3[j] * xk
            y[t, o] = a0
            y[t, o + 1] = a1
            y[t, o + 2] = a2
            y[t, o + 3] = a3
            y[t + 1, o] = c0
            y[t + 1, o + 1] = c1
            y[t + 1, o + 2] = c2
            y[t + 1, o + 3] = c3
        for t in range(T2, T):
            xt = x[t]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for j in range(n):
                xj = xt[j]
                a0 += b0[j] * xj
                a1 += b1[j] * xj
                a2 += b2[j] * xj
                a3 += b3[j] * xj
            y[t, o] = a0
            y[t, o + 1] = a1
            y[t, o + 2] = a2
            y[t, o + 3] = a3
    else:
        for r in range(nr):
            br = buf[r]
            for t in range(T):
                xt = x[t]
                acc = np.float32(0.0)
                for j in range(n):
                    acc += br[j] * xt[j]
                y[t, o + r] = acc
    if bias.size:
        for t in range(T):
            for r in range(nr):
                y[t, o + r] += bias[o + r]


@njit(**JIT_PARALLEL)
def gemm_bf16_par(x, W, y, bias, nthreads):
    """y = x @ W.T (+ bias) for several tokens, W any row source: each block of four rows is
    widened once into an L1 scratch and reused for every token. Also run by
    :mod:`zipmoe_rt.kernels.packed` on the compute form.

    Args:
        x: float32 ``[T, n]``.  W: ``[out, n]`` BF16 weights, any row source of
            :mod:`zipmoe_rt.kernels.rows`.  y: float32 ``[T, out]``, written.
        bias: float32 ``[out]``, or an empty array for none.  nthreads: threads to split over.
    """
    out = y.shape[1]
    n = x.shape[1]
    nblocks = (out + 3) // 4
    nchunks = max(1, min(nblocks, nthreads))
    for c in prange(nchunks):
        buf = np.empty((4, n), np.float32)
        s = np.empty((4, n), np.uint16)
        b0 = c * nblocks // nchunks
        b1 = (c + 1) * nblocks // nchunks
        for b in range(b0, b1):
            o = b * 4
            e = min(o + 4, out)
            widen_rows_bf16(W, o, e, buf, s)
            dot_block(x, buf, e - o, y, bias, o)


@njit(**JIT_PARALLEL)
def _gemm_f16_par(x, W, y, bias, nthreads):
    out, n = W.shape
    nblocks = (out + 3) // 4
    nchunks = max(1, min(nblocks, nthreads))
    for c in prange(nchunks):
        buf = np.empty((4, n), np.float32)
        b0 = c * nblocks // nchunks
        b1 = (c + 1) * nblocks // nchunks
        for b in range(b0, b1):
            o = b * 4
            e = min(o + 4, out)
            _widen_rows_f16(W, o, e, buf)
            dot_block(x, buf, e - o, y, bias, o)


@njit(**JIT_PARALLEL)
def _gemm_f32_par(x, W, y, bias, nthreads):
    out, n = W.shape
    nblocks = (out + 3) // 4
    nchunks = max(1, min(nblocks, nthreads))
    for c in prange(nchunks):
        buf = np.empty((4, n), np.float32)
        b0 = c * nblocks // nchunks
        b1 = (c + 1) * nblocks // nchunks
        for b in range(b0, b1):
            o = b * 4
            e = min(o + 4, out)
            _copy_rows_f32(W, o, e, buf)
            dot_block(x, buf, e - o, y, bias, o)


@njit(**JIT_SERIAL)
def gemm_bf16_serial(x, W, y, bias):
    """:func:`gemm_bf16_par` on one thread (same arguments but ``nthreads``)."""
    out = y.shape[1]
    n = x.shape[1]
    buf = np.empty((4, n), np.float32)
    s = np.empty((4, n), np.uint16)
    for o in range(0, out, 4):
        e = min(o + 4, out)
        widen_rows_bf16(W, o, e, buf, s)
        dot_block(x, buf, e - o, y, bias, o)


@njit(**JIT_SERIAL)
def _gemm_f16_serial(x, W, y, bias):
    out, n = W.shape
    buf = np.empty((4, n), np.float32)
    for o in range(0, out, 4):
        e = min(o + 4, out)
        _widen_rows_f16(W, o, e, buf)
        dot_block(x, buf, e - o, y, bias, o)


@njit(**JIT_SERIAL)
def _gemm_f32_serial(x, W, y, bias):
    out, n = W.shape
    buf = np.empty((4, n), np.float32)
    for o in range(0, out, 4):
        e = min(o + 4, out)
        _copy_rows_f32(W, o, e, buf)
        dot_block(x, buf, e - o, y, bias, o)


# ---------------------------------------------------------------------------------------------
# public wrappers

_KINDS = {np.dtype(np.uint16): "bf16", np.dtype(np.float16): "f16", np.dtype(np.float32): "f32"}


def weight_kind(W: np.ndarray) -> str:
    """``"bf16"``, ``"f16"`` or ``"f32"`` for a weight array (uint16 means BF16 bits).

    Raises:
        TypeError: any other dtype.
    """
    kind = _KINDS.get(W.dtype)
    if kind is None:
        raise TypeError(f"weight dtype {W.dtype} is not supported "
                        "(BF16 as uint16, float16, float32)")
    return kind


def linear_into(x: np.ndarray, W: np.ndarray, y: np.ndarray, bias: np.ndarray | None = None,
                parallel: bool = True) -> np.ndarray:
    """``y[:] = x @ W.T (+ bias)`` into a preallocated output (the model's hot path).

    Args:
        x: float32 [T, in], C-contiguous.
        W: [out, in] C-contiguous; uint16 (BF16 bits), float16 or float32.
        y: float32 [T, out], C-contiguous; overwritten.
        bias: optional float32 [out].
        parallel: False uses the single-threaded kernels (safe from worker threads).
    Returns:
        ``y``.
    Raises:
        TypeError: unsupported weight dtype.
    """
    b = _NO_BIAS if bias is None else bias
    kind = _KINDS.get(W.dtype)
    par = parallel and x.shape[0] * W.shape[0] * W.shape[1] >= PAR_MIN_WORK and W.shape[0] >= 8
    if kind == "bf16":
        if x.shape[0] == 1:
            if par:
                gemv_bf16_par(x[0], W, y[0], b, get_num_threads())
            else:
                gemv_bf16_serial(x[0], W, y[0], b)
        else:
            if par:
                gemm_bf16_par(x, W, y, b, get_num_threads())
            else:
                gemm_bf16_serial(x, W, y, b)
    elif kind == "f16":
        if par:
            _gemm_f16_par(x, W.view(np.uint16), y, b, get_num_threads())
        else:
            _gemm_f16_serial(x, W.view(np.uint16), y, b)
    elif kind == "f32":
        if par:
            _gemm_f32_par(x, W, y, b, get_num_threads())
        else:
            _gemm_f32_serial(x, W, y, b)
    else:
        weight_kind(W)
    return y


def linear(x: np.ndarray, W: np.ndarray, bias: np.ndarray | None = None,
           parallel: bool = True) -> np.ndarray:
    """``x @ W.T (+ bias)`` with float32 accumulation, like ``torch.nn.functional.linear`` on
    float32 (transformers' ``nn.Linear`` in every modeling file).

    Args:
        x: float32 [T, in] or [in] (other float dtypes are converted).
        W: [out, in]; uint16 = BF16 bit patterns (fast path), float16 or float32.
        bias: optional [out] (converted to float32).
        parallel: False forces the single-threaded kernels.
    Returns:
        float32 [T, out], or [out] when ``x`` is 1-D.
    Raises:
        TypeError: unsupported weight dtype.
        ValueError: shape mismatch between ``x`` and ``W``/``bias``.
    """
    weight_kind(W)
    x = np.asarray(x)
    one = x.ndim == 1
    x2 = np.ascontiguousarray(x.reshape(1, -1) if one else x, dtype=np.float32)
    if x2.ndim != 2 or W.ndim != 2 or x2.shape[1] != W.shape[1]:
        raise ValueError(f"linear: x {x.shape} does not match W {W.shape} ([out, in])")
    if bias is not None:
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if bias.shape != (W.shape[0],):
            raise ValueError(f"linear: bias {bias.shape} does not match W {W.shape}")
    W = np.ascontiguousarray(W)
    y = np.empty((x2.shape[0], W.shape[0]), np.float32)
    if x2.shape[0]:
        linear_into(x2, W, y, bias, parallel)
    return y[0] if one else y
