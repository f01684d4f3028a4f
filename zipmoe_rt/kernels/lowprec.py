"""Numba kernels of the low-precision expert formats: the FP8 E4M3 bit-plane merge (format/SPEC.md
§5.1, nibble-packed sign+mantissa), its fused Huffman decode, the exact FP8 block dequantisation
and the MXFP4 (OCP microscaling, gpt-oss) dequantisation and matrix-vector product.

Exactness: every E4M3 value and every E2M1 value times a power of two (in float32's range) is a
float32; the FP8 dequantisation is one float32 product per weight, ``value * scale_inv``, as
transformers' ``Fp8Dequantize`` computes it (``integrations/finegrained_fp8.py``: the FP8 tensor
cast to float32, times the block's float32 scale), so the results are bit-identical to it.

Single-threaded and ``nogil`` (decode workers call them from several threads), compiled without
bounds checks: each docstring states its preconditions, which
:mod:`zipmoe_rt.engine.lowprec` checks before each call.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from zmoe.fp8 import E4M3_TO_F32
from zmoe.huffman import decode_into

_OPT = dict(nogil=True, cache=True, boundscheck=False)

#: decode status of an F8_E4M3 chunk that decodes to an exponent above 15 (a 4-bit field)
EXPONENT_TOO_LARGE = 100

#: E2M1 (FP4) code -> float32 value, sign in bit 3 (OCP MX specification; transformers'
#: ``FP4_VALUES`` in ``integrations/mxfp4.py``)
E2M1_TO_F32 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


@nb.njit(**_OPT)
def _merge_pairs(e16, sm, out16):
    """Two E4M3 bytes per uint16 lane from two exponents (one uint16) and one SM byte (its low
    nibble the first element); returns the OR of the exponent lanes (to check they are ≤ 15)."""
    acc = np.uint16(0)
    for p in range(e16.shape[0]):
        s = np.uint16(sm[p])
        e = e16[p]
        acc |= e
        out16[p] = (((s & np.uint16(8)) << np.uint16(4)) | (s & np.uint16(7))
                    | ((s & np.uint16(0x80)) << np.uint16(8))
                    | ((s & np.uint16(0x70)) << np.uint16(4)) | (e << np.uint16(3)))
    return acc


@nb.njit(**_OPT)
def _merge_one(e, sm, j):
    s = (sm[j >> 1] >> ((j & 1) << 2)) & 15
    return np.uint8(((s & 8) << 4) | ((e & 15) << 3) | (s & 7))


@nb.njit(**_OPT)
def merge_f8(exp, sm, start, out):
    """E4M3 bytes from an exponent chunk and the packed SM plane:
    ``out[i] = (s >> 3) << 7 | exp[i] << 3 | (s & 7)`` with ``s`` the 4-bit value of element
    ``start + i`` (low nibble of ``sm[(start + i) // 2]`` when even, high nibble when odd).
    Two elements per uint16 lane (vectorised), whatever the alignment of ``start``.

    Args:
        exp: uint8 [n] exponents.  sm: uint8 packed SM plane of the whole tensor.
        start: index of the chunk's first element in the tensor.  out: uint8 [n].

    Returns:
        True when every exponent is ≤ 15 (else the output is wrong: the plane is corrupt).

    Preconditions (unchecked): ``sm.shape[0] >= (start + n + 1) // 2``, ``out.shape[0] >= n``.
    """
    n = exp.shape[0]
    i = 0
    bad = np.uint16(0)
    if start & 1 and n > 0:
        bad |= np.uint16(exp[0])
        out[0] = _merge_one(exp[0], sm, start)
        i = 1
    k = (start + i) >> 1
    m = (n - i) >> 1
    if m > 0:
        bad |= _merge_pairs(exp[i:i + 2 * m].view(np.uint16), sm[k:k + m],
                            out[i:i + 2 * m].view(np.uint16))
    if (n - i) & 1:
        bad |= np.uint16(exp[n - 1])
        out[n - 1] = _merge_one(exp[n - 1], sm, start + n - 1)
    return (bad & np.uint16(0xF0F0)) == 0


@nb.njit(**_OPT)
def decode_merge_f8_chunks(exp, offs, sizes, raws, sm, start, out, scratch, keys, ent, len1, state):
    """Decode consecutive Huffman exponent chunks of one F8_E4M3 tensor and merge each with its
    nibbles (:func:`merge_f8`), in one call without the GIL (format/SPEC.md §5.1, §5.3).

    Args:
        exp: uint8 exponent-region buffer.  offs, sizes, raws: int64 [m] chunk offsets, sizes
            and exponent counts (consecutive chunks).
        sm: uint8 packed SM plane of the whole tensor.  start: first element of chunk 0.
        out: uint8 [Σ raws].  scratch: uint8 [≥ max raws].  keys, ent, len1, state: a thread's
            :func:`zmoe.huffman.table_cache` arrays.

    Preconditions (unchecked): ``offs[i] + sizes[i] <= exp.shape[0]``, all ≥ 0;
    ``sm.shape[0] >= (start + Σ raws + 1) // 2``; ``out`` ≥ Σ raws; ``scratch`` ≥ max raws.
    The chunk bytes are untrusted: :func:`zmoe._huffjit.decode_into` checks them.

    Returns:
        (-1, 0) on success, else (index of the failing chunk, its decode status:
        :data:`zmoe.huffman.DECODE_STATUS`, or :data:`EXPONENT_TOO_LARGE`).
    """
    pos = 0
    for i in range(offs.shape[0]):
        n = raws[i]
        st = decode_into(exp[offs[i]:offs[i] + sizes[i]], n, scratch[:n], keys, ent, len1, state)
        if st != 0:
            return i, st
        if not merge_f8(scratch[:n], sm, start + pos, out[pos:pos + n]):
            return i, EXPONENT_TOO_LARGE
        pos += n
    return -1, 0


@nb.njit(**_OPT)
def _dequant_fp8(q, scale, bm, bn, lut, out):
    rows, cols = q.shape
    tab = np.empty(256, np.float32)       # the block's 256 products: a look-up per weight
    for rb in range(scale.shape[0]):
        for cb in range(scale.shape[1]):
            f = scale[rb, cb]
            for k in range(256):
                tab[k] = lut[k] * f
            c0, c1 = cb * bn, min(cols, (cb + 1) * bn)
            for r in range(rb * bm, min(rows, (rb + 1) * bm)):
                qr, orow = q[r], out[r]
                for c in range(c0, c1):
                    orow[c] = tab[qr[c]]


def dequant_fp8(q: np.ndarray, scale: np.ndarray, block, out: np.ndarray | None = None):
    """``out[r, c] = e4m3(q[r, c]) * scale[r // bm, c // bn]`` in float32 (transformers'
    ``Fp8Dequantize._dequantize_one``; DeepSeek-V3's ``weight_dequant``).

    Args:
        q: uint8 [R, C] E4M3 bytes.  scale: float32 [ceil(R / bm), ceil(C / bn)]
            (``weight_scale_inv``).  block: (bm, bn) ``weight_block_size``.
        out: optional float32 [R, C].
    Returns:
        float32 [R, C].
    Raises:
        ValueError: shapes that do not fit each other (named).
    """
    bm, bn = int(block[0]), int(block[1])
    if q.ndim != 2 or scale.ndim != 2 or bm < 1 or bn < 1:
        raise ValueError(f"dequant_fp8: weight {q.shape} and scale {scale.shape} must be 2-D, "
                         f"block {tuple(block)} positive")
    want = (-(-q.shape[0] // bm), -(-q.shape[1] // bn))
    if scale.shape != want:
        raise ValueError(f"dequant_fp8: scale shape {list(scale.shape)}, but a {list(q.shape)} "
                         f"weight in blocks of {[bm, bn]} needs {list(want)}")
    if out is None:
        out = np.empty(q.shape, np.float32)
    _dequant_fp8(np.ascontiguousarray(q, np.uint8), np.ascontiguousarray(scale, np.float32),
                 bm, bn, E4M3_TO_F32, out)
    return out


@nb.njit(**_OPT)
def _dequant_mxfp4(blocks, scales, lut, out):
    rows, groups, width = blocks.shape
    for r in range(rows):
        orow = out[r]
        for g in range(groups):
            e = np.int32(scales[r, g]) - 127
            f = np.float32(2.0 ** e)      # exact in float64; 2^128 -> inf, as ldexp
            blk = blocks[r, g]
            base = g * 2 * width
            for j in range(width):
                b = blk[j]
                orow[base + 2 * j] = lut[b & 15] * f
                orow[base + 2 * j + 1] = lut[b >> 4] * f


def dequant_mxfp4(blocks: np.ndarray, scales: np.ndarray, out: np.ndarray | None = None):
    """MXFP4 weights to float32: ``out[r, 32g + 2j] = e2m1(blocks[r, g, j] & 15) * 2^(s - 127)``
    and ``out[r, 32g + 2j + 1]`` the same with the high nibble, ``s = scales[r, g]`` (the OCP
    MX e8m0 scale; transformers' ``convert_moe_packed_tensors`` in ``integrations/mxfp4.py``:
    low nibble first, ``ldexp`` by ``scale - 127``). Exact: a power of two times an E2M1 value.

    Args:
        blocks: uint8 [R, G, 16] (two E2M1 codes per byte).  scales: uint8 [R, G].
        out: optional float32 [R, 32 G].
    Returns:
        float32 [R, 32 G].
    Raises:
        ValueError: shapes that do not fit each other.
    """
    if blocks.ndim != 3 or scales.shape != blocks.shape[:2]:
        raise ValueError(f"dequant_mxfp4: blocks {list(blocks.shape)} must be [rows, groups, "
                         f"bytes] and scales {list(scales.shape)} [rows, groups]")
    if out is None:
        out = np.empty((blocks.shape[0], blocks.shape[1] * blocks.shape[2] * 2), np.float32)
    _dequant_mxfp4(np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(scales, np.uint8),
                   E2M1_TO_F32, out)
    return out


@nb.njit(**_OPT)
def _mxfp4_matvec(blocks, scales, x, lut, out):
    rows, groups, width = blocks.shape
    for t in range(x.shape[0]):
        for r in range(rows):
            acc = np.float32(0.0)
            for g in range(groups):
                e = np.int32(scales[r, g]) - 127
                f = np.float32(2.0 ** e)
                base = g * 2 * width
                for j in range(width):
                    b = blocks[r, g, j]
                    acc += (lut[b & 15] * f) * x[t, base + 2 * j]
                    acc += (lut[b >> 4] * f) * x[t, base + 2 * j + 1]
            out[t, r] = acc


def mxfp4_linear(x: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``x @ W.T`` with ``W`` the MXFP4 weight (:func:`dequant_mxfp4`) dequantised inside the
    loop, one weight at a time, never as a whole matrix; float32 accumulation in input order.

    Args:
        x: float32 [T, 32 G].  blocks: uint8 [N, G, 16].  scales: uint8 [N, G].
    Returns:
        float32 [T, N].
    Raises:
        ValueError: shapes that do not fit.
    """
    if blocks.ndim != 3 or scales.shape != blocks.shape[:2] or x.ndim != 2 \
            or x.shape[1] != blocks.shape[1] * blocks.shape[2] * 2:
        raise ValueError(f"mxfp4_linear: x {list(x.shape)}, blocks {list(blocks.shape)}, scales "
                         f"{list(scales.shape)} do not fit (x [T, 32 * groups])")
    out = np.empty((x.shape[0], blocks.shape[0]), np.float32)
    _mxfp4_matvec(np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(scales, np.uint8),
                  np.ascontiguousarray(x, np.float32), E2M1_TO_F32, out)
    return out
