"""Numba kernels that merge bit-planes back into words (format/SPEC.md §5.1; ZipMoE §3.1).

Single-threaded and ``nogil`` on purpose: decode workers call them from several threads at once,
each on its own chunk, right after zstd decoded that chunk (so the exponents are still in cache).

The kernels are compiled without bounds checks: each docstring states its preconditions. The
sizes come from a file's index, which :mod:`zmoe.validate` proves consistent when the file is
opened (format/SPEC.md §9: SM plane = elements x SM bytes, the chunks' ``raw_size`` sum to the
elements, every piece inside its region), and :mod:`zipmoe_rt.engine.layout` checks the slices
again right before each call.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from zmoe.huffman import decode_into


@nb.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def merge_bf16(exp, sm, out):
    """out[i] = (sm[i] >> 7) << 15 | exp[i] << 7 | (sm[i] & 0x7F).

    Args:
        exp: uint8 [n] exponent plane (or a chunk of it).
        sm: uint8 [n] sign+mantissa plane, same range.
        out: uint16 [n] destination (BF16 bit patterns).

    Preconditions (unchecked): ``sm.shape[0] >= n`` and ``out.shape[0] >= n``, n = exp.shape[0].
    """
    for i in range(exp.shape[0]):
        s = np.uint16(sm[i])
        out[i] = ((s & np.uint16(0x80)) << np.uint16(8)) | (np.uint16(exp[i]) << np.uint16(7)) \
            | (s & np.uint16(0x7F))


@nb.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def merge_f16(exp, sm, out):
    """FP16: out[i] = (smv >> 10) << 15 | exp << 10 | (smv & 0x3FF), smv = uint16 LE from sm[2i:2i+2].

    exp uint8 [n], sm uint8 [2n], out uint16 [n].

    Preconditions (unchecked): ``sm.shape[0] >= 2n`` and ``out.shape[0] >= n``."""
    for i in range(exp.shape[0]):
        v = np.uint16(sm[2 * i]) | (np.uint16(sm[2 * i + 1]) << np.uint16(8))
        out[i] = ((v & np.uint16(0x400)) << np.uint16(5)) | (np.uint16(exp[i]) << np.uint16(10)) \
            | (v & np.uint16(0x3FF))


@nb.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def merge_f32(exp, sm, out):
    """FP32: out[i] = (smv >> 23) << 31 | exp << 23 | (smv & 0x7FFFFF), smv = 3 bytes LE.

    exp uint8 [n], sm uint8 [3n], out uint32 [n].

    Preconditions (unchecked): ``sm.shape[0] >= 3n`` and ``out.shape[0] >= n``."""
    for i in range(exp.shape[0]):
        v = np.uint32(sm[3 * i]) | (np.uint32(sm[3 * i + 1]) << np.uint32(8)) \
            | (np.uint32(sm[3 * i + 2]) << np.uint32(16))
        out[i] = ((v & np.uint32(0x800000)) << np.uint32(8)) | (np.uint32(exp[i]) << np.uint32(23)) \
            | (v & np.uint32(0x7FFFFF))


#: dtype -> (kernel, SM bytes per element, output numpy dtype)
MERGE = {"BF16": (merge_bf16, 1, np.uint16), "F16": (merge_f16, 2, np.uint16),
         "F32": (merge_f32, 3, np.uint32)}


@nb.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
def decode_merge_bf16_chunks(exp, offs, sizes, raws, sm, out, scratch, keys, ent, len1, state):
    """Decode consecutive Huffman exponent chunks of one BF16 tensor and merge each with its
    sign+mantissa bytes, in one call without the GIL (format/SPEC.md §5.1, §5.3).

    Chunk ``i`` is ``exp[offs[i]:offs[i]+sizes[i]]`` and codes ``raws[i]`` exponents; the
    chunks are consecutive, so chunk ``i`` fills ``out`` (and reads ``sm``) from the sum of the
    earlier ``raws``. Each chunk is decoded into ``scratch`` (still in cache for its merge).

    Args:
        exp: uint8 exponent-region buffer.  offs, sizes, raws: int64 [m].
        sm: uint8 [Σ raws] sign+mantissa bytes of these chunks.  out: uint16 [Σ raws].
        scratch: uint8 [≥ max raws].  keys, ent, len1, state: a thread's
            :func:`zmoe.huffman.table_cache` arrays.

    Preconditions (unchecked; :func:`zipmoe_rt.engine.layout.decode_chunks` checks them before
    the call): ``offs``, ``sizes``, ``raws`` ≥ 0 and of one length m; ``offs[i] + sizes[i] <=
    exp.shape[0]``; ``sm`` and ``out`` hold at least ``Σ raws`` elements; ``scratch`` at least
    ``max(raws)``. The chunk bytes themselves are untrusted: :func:`zmoe._huffjit.decode_into`
    checks them and never writes past ``scratch[:raws[i]]``.

    Returns:
        (-1, 0) on success, else (index of the failing chunk, its :data:`zmoe.huffman.DECODE_STATUS`).
    """
    pos = 0
    for i in range(offs.shape[0]):
        n = raws[i]
        st = decode_into(exp[offs[i]:offs[i] + sizes[i]], n, scratch[:n], keys, ent, len1, state)
        if st != 0:
            return i, st
        merge_bf16(scratch[:n], sm[pos:pos + n], out[pos:pos + n])
        pos += n
    return -1, 0
