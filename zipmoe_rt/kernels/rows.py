"""Row sources of the BF16 matrix kernels: where a kernel step gets the BF16 bits of one weight
row. The GEMV, GEMM and SwiGLU kernels of :mod:`zipmoe_rt.kernels.linear` and
:mod:`zipmoe_rt.kernels.swiglu` are written once against :func:`row_of` and compiled by Numba
for each kind of matrix they are handed:

* a BF16 matrix (uint16 ``[out, in]``): the row is read in place (``W[r]``, no copy);
* a matrix in the compute form of design note §6.5 (the tuple :func:`packed_source` makes of a
  :class:`~zipmoe_rt.models.packed.PackedMatrix`): the row is decoded into a per-thread
  scratch row of a few KB, which stays in L1, and the kernel reads that;
* for the k experts of one token (:func:`row_k`, arguments from :func:`k_sources`): all BF16,
  all packed, or a mix, BF16 or packed chosen per expert at run time.

Whatever the source, the kernel then runs the same dot loop over the row, so the float32
summation order, and hence every output bit, is the same for a BF16 matrix and for its compute
form.

The compute form's decode (:func:`unpack_row`): per row, byte ``j`` of ``nib`` holds the 4-bit
exponent index of column ``j`` (low nibble) and of column ``h + j`` (high nibble, ``h =
(in + 1) // 2``); index ``v < 15`` is exponent ``base + v``, 15 an escape whose exponent is in
the row's escape list. A weight's bits are ``(sm & 0x80) << 8 | exponent << 7 | (sm & 0x7F)``
(format/SPEC.md §5.1 split backwards).

Numba's on-disk cache keys each kernel on its own source file only: after a change to this
module, touch :mod:`~zipmoe_rt.kernels.linear` and :mod:`~zipmoe_rt.kernels.swiglu` (or delete
their ``__pycache__/*.nbi``/``*.nbc``) so that their kernels are compiled again.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

__all__ = ["row_of", "row_k", "unpack_row", "unpack_row_masked", "unpack_row_shifted",
           "WIDE_VECTORS", "packed_source", "k_sources"]

U16 = np.uint16


@njit(inline="always")
def bf16_word(s, e):
    """BF16 bits (uint16) from a sign+mantissa byte ``s`` (uint16) and ``e = exponent << 7``:
    ``((s << 8 | s) & 0x807F) | e``. Every step is cast back to uint16 so that LLVM vectorises
    on 16-bit lanes (Numba widens integer arithmetic to 64 bits, a quarter of the lanes)."""
    return U16(U16(U16(U16(s << U16(8)) | s) & U16(0x807F)) | e)


def _wide_vectors() -> bool:
    """Whether the kernels are compiled for AVX-512BW (512-bit vectors of 16-bit lanes):
    ``NUMBA_CPU_FEATURES`` when set (kernels built for another CPU), else the host's features
    as LLVM reports them."""
    from numba.core import config
    if config.CPU_FEATURES:
        return "+avx512bw" in config.CPU_FEATURES.split(",")
    from llvmlite import binding as llvm
    return bool(llvm.get_host_cpu_features().get("avx512bw"))


@njit(inline="always")
def unpack_row_masked(nib, sm, b7, ep, ec, ev, r, dst):
    """:func:`unpack_row`, each word assembled as ``(s & 0x80) << 8 | (s & 0x7F) | (v << 7) +
    (base << 7)``, the index taken from its byte with a mask (low nibble) or a shift (high)."""
    n = dst.shape[0]
    h = (n + 1) >> 1
    nr = nib[r]
    sr = sm[r]
    for j in range(h):
        s = U16(sr[j])
        e = U16(U16(U16(nr[j]) & U16(15)) << U16(7))
        dst[j] = U16(U16(U16(s & U16(0x80)) << U16(8)) | U16(s & U16(0x7F))) | U16(e + b7)
    sh = sr[h:]
    dh = dst[h:]
    for j in range(n - h):
        s = U16(sh[j])
        e = U16(U16(U16(nr[j]) >> U16(4)) << U16(7))
        dh[j] = U16(U16(U16(s & U16(0x80)) << U16(8)) | U16(s & U16(0x7F))) | U16(e + b7)
    for t in range(ep[r], ep[r + 1]):
        c = ec[t]
        dst[c] = bf16_word(U16(sr[c]), U16(U16(ev[t]) << U16(7)))


@njit(inline="always")
def unpack_row_shifted(nib, sm, b7, ep, ec, ev, r, dst):
    """:func:`unpack_row`, each word assembled as :func:`bf16_word` of its byte and the index
    shifted into place from the byte (``byte << 7`` or ``byte << 3``, masked to ``0x780``),
    plus ``base << 7``."""
    n = dst.shape[0]
    h = (n + 1) >> 1
    nr = nib[r]
    sr = sm[r]
    m = U16(0x780)
    for j in range(h):
        e = U16(U16(U16(nr[j]) << U16(7)) & m)
        dst[j] = U16(bf16_word(U16(sr[j]), e) + b7)
    sh = sr[h:]
    dh = dst[h:]
    for j in range(n - h):
        e = U16(U16(U16(nr[j]) << U16(3)) & m)
        dh[j] = U16(bf16_word(U16(sh[j]), e) + b7)
    for t in range(ep[r], ep[r + 1]):
        c = ec[t]
        dst[c] = bf16_word(U16(sr[c]), U16(U16(ev[t]) << U16(7)))


#: the row decode compiled into the kernels: ``unpack_row(nib, sm, b7, ep, ec, ev, r, dst)``
#: sets ``dst`` (uint16 ``[in]``) to the BF16 bits of row ``r`` of a matrix in the compute form
#: (nib: uint8 ``[out, (in + 1) // 2]`` exponent indices; sm: uint8 ``[out, in]`` sign+mantissa
#: plane; b7: uint16 ``base << 7``; ep: int64 ``[out + 1]`` escape offsets per row; ec: int32
#: escaped columns; ev: uint8 their exponents): two unit-stride loops (low nibbles: columns
#: ``0 .. h-1``; high nibbles: ``h .. in-1``) that vectorise on 16-bit lanes, then the row's
#: escapes patched in (an index 15 decodes to a wrong exponent first, possibly carrying into
#: the sign bit, and is overwritten). Two forms of the same bits; the faster on the CPU the
#: kernels are compiled for: with AVX-512BW the masked form (``tools/bench_packed.py`` on an
#: Intel Xeon: its decode 0.88-0.90x the shifted form's time), with AVX2 alone the shifted
#: form (on an AMD EPYC: the masked form's decode 1.07-1.35x and its packed GEMV 1.10-1.26x the
#: shifted form's, in memory and in cache)
WIDE_VECTORS = _wide_vectors()
unpack_row = unpack_row_masked if WIDE_VECTORS else unpack_row_shifted


def row_of(src, r, buf):
    """The BF16 bits of row ``r`` of matrix ``src`` as a uint16 ``[in]`` array (Numba only).

    Args:
        src: uint16 ``[out, in]`` BF16 bits or a :func:`packed_source` tuple.
        r: the row.  buf: uint16 ``[in]`` scratch row, used when ``src`` must be decoded.
    Returns:
        ``src[r]`` (a view) for BF16 bits; ``buf`` holding the decoded row otherwise.
    """
    raise NotImplementedError("row_of is compiled into the Numba kernels only")


@overload(row_of, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
def _row_of(src, r, buf):
    if isinstance(src, types.Array):
        def bf16(src, r, buf):
            return src[r]
        return bf16
    if isinstance(src, types.BaseTuple) and len(src) == 6:
        def packed(src, r, buf):
            unpack_row(src[0], src[1], src[2], src[3], src[4], src[5], r, buf)
            return buf
        return packed
    return None


def row_k(W, N, S, B, P, C, V, e, r, buf):
    """The BF16 bits of row ``r`` of matrix ``e`` of k matrices given component-wise (Numba
    only; a tuple of tuples cannot enter a parallel region), as :func:`k_sources` builds them:
    ``W`` a tuple of k BF16 matrices, ``N, S, P, C, V`` tuples of the compute forms' ``nib, sm,
    esc_ptr, esc_col, esc_val`` and ``B`` uint16 ``[k]`` their ``base << 7``; matrix ``e`` is
    BF16 if ``W[e]`` has rows, else packed.
    Returns ``W[e][r]`` (a view) or ``buf`` holding the decoded row."""
    raise NotImplementedError("row_k is compiled into the Numba kernels only")


@overload(row_k, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
def _row_k(W, N, S, B, P, C, V, e, r, buf):
    def either(W, N, S, B, P, C, V, e, r, buf):
        if W[e].shape[0]:
            return W[e][r]
        unpack_row(N[e], S[e], B[e], P[e], C[e], V[e], r, buf)
        return buf
    return either


def packed_source(P) -> tuple:
    """The row source of a :class:`~zipmoe_rt.models.packed.PackedMatrix`: ``(nib, sm,
    base << 7 as uint16, esc_ptr, esc_col, esc_val)`` (built once per matrix)."""
    return P.source


_NIB0 = np.zeros((0, 0), np.uint8)
_PTR0 = np.zeros(1, np.int64)
_COL0 = np.zeros(0, np.int32)
_VAL0 = np.zeros(0, np.uint8)
_W0: dict = {}


#: the compute-form components of a BF16 matrix in a mixed call (never read)
_BF16_STANDIN = (_NIB0, _NIB0, U16(0), _PTR0, _COL0, _VAL0)


def _no_rows(cols: int, writeable: bool) -> np.ndarray:
    """A shared uint16 ``[0, cols]`` stand-in for the BF16 matrix of a packed one."""
    a = _W0.get((cols, writeable))
    if a is None:
        a = _W0[(cols, writeable)] = np.zeros((0, cols), np.uint16)
        a.flags.writeable = writeable
    return a


def _readonly(a):
    v = a.view()
    v.flags.writeable = False
    return v


def _uniform(arrays, empty):
    """``arrays`` (None marks a stand-in, filled with ``empty``) with one ``writeable`` flag:
    as they are when all are writeable (the common case: no copies, no views), else as
    read-only views."""
    if all(a is None or a.flags.writeable for a in arrays):
        return tuple(empty if a is None else a for a in arrays)
    ro = _readonly(empty)
    return tuple(ro if a is None else _readonly(a) for a in arrays)


def k_sources(mats, cols: int):
    """The seven component arguments ``(W, N, S, B, P, C, V)`` of :func:`row_k` for k
    matrices of one shape, each BF16 bits (uint16 ``[out, in]``, C-contiguous) or a
    :class:`~zipmoe_rt.models.packed.PackedMatrix`; ``cols`` is ``in``.

    A BF16 matrix has empty stand-ins for the compute form's arrays, a packed one a ``W`` with
    no rows; within ``W`` and within ``S`` all arrays share one ``writeable`` flag. So whatever
    the mix of kinds, the kernel is compiled once per k, and all-BF16, all-packed and mixed
    calls run the same machine code: the same summation order and the same floating-point
    contractions (kernels compiled separately per kind may fuse a multiply-add in one and not
    in the other)."""
    dense = [m if isinstance(m, np.ndarray) else None for m in mats]
    packed = [None if isinstance(m, np.ndarray) else m for m in mats]
    W = _uniform(dense, _no_rows(cols, True))
    if all(m is None for m in packed):
        k = len(mats)
        return (W, (_NIB0,) * k, (_NIB0,) * k, np.zeros(k, np.uint16), (_PTR0,) * k,
                (_COL0,) * k, (_VAL0,) * k)
    N, S, B, P, C, V = zip(*(_BF16_STANDIN if m is None else m.source for m in packed))
    if not all(a.flags.writeable for a in S):
        S = tuple(_readonly(a) for a in S)
    return W, N, S, np.array(B, np.uint16), P, C, V
