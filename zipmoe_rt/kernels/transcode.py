"""The transcoder of the compute form (design note §6.5): a BF16 tensor's exponent plane into a
4-bit index into the window of 15 consecutive exponents that holds most of them, and an escape
list for the rest (layout: :mod:`zipmoe_rt.kernels.packed`). Single-threaded and ``nogil``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .linear import JIT_SERIAL

__all__ = ["window_base", "pack_plane", "split_bf16_into", "ESCAPE", "WINDOW"]

#: exponents a 4-bit index covers (``base .. base + 14``); index 15 marks an escape.
WINDOW = 15
ESCAPE = 15


# ---------------------------------------------------------------------------------------------
# transcoder


@njit(**JIT_SERIAL)
def _histogram(x):
    """int64 [256] counts of the uint8 values of ``x`` (four partial tables, so that runs of
    one value do not serialise on one counter)."""
    h = np.zeros((4, 256), np.int64)
    n4 = x.size & ~3
    for i in range(0, n4, 4):
        h[0, x[i]] += 1
        h[1, x[i + 1]] += 1
        h[2, x[i + 2]] += 1
        h[3, x[i + 3]] += 1
    for i in range(n4, x.size):
        h[0, x[i]] += 1
    return h[0] + h[1] + h[2] + h[3]


def window_base(exp: np.ndarray) -> int:
    """The ``base`` whose window ``base .. base + 14`` holds the most exponents of ``exp``.

    Args:
        exp: uint8 exponent plane (any shape).
    Returns:
        int in ``0 .. 241`` (ties: the lowest base).
    """
    h = _histogram(np.ascontiguousarray(exp, np.uint8).reshape(-1))
    c = np.convolve(h, np.ones(WINDOW, np.int64), "valid")   # c[b] = sum h[b : b + 15]
    return int(np.argmax(c))


@njit(**JIT_SERIAL)
def _pack(exp, rows, cols, base, nib, esc_ptr):
    """nib (escapes as 15) and per-row escape counts -> esc_ptr prefix sums; returns total.

    Works on 8-bit lanes (``(e - base) mod 256``, an escape when ``>= 15``) in unit-stride loops
    over the two halves of a row, so that LLVM vectorises them."""
    h = (cols + 1) >> 1
    b = np.uint8(base)
    esc = np.uint8(ESCAPE)
    total = 0
    for r in range(rows):
        esc_ptr[r] = total
        er = exp[r * cols:(r + 1) * cols]
        nr = nib[r]
        n = 0
        for j in range(cols - h):        # both nibbles
            lo = np.uint8(er[j] - b)
            hi = np.uint8(er[h + j] - b)
            el = lo >= esc
            eh = hi >= esc
            lo = esc if el else lo
            hi = esc if eh else hi
            n += np.int64(el) + np.int64(eh)
            nr[j] = np.uint8(lo | np.uint8(hi << np.uint8(4)))
        for j in range(cols - h, h):     # odd cols: the last low nibble has no high partner
            lo = np.uint8(er[j] - b)
            el = lo >= esc
            n += np.int64(el)
            nr[j] = esc if el else lo
        total += n
    esc_ptr[rows] = total
    return total


@njit(**JIT_SERIAL)
def _pack_escapes(exp, rows, cols, base, esc_col, esc_val):
    t = 0
    for r in range(rows):
        er = exp[r * cols:(r + 1) * cols]
        for j in range(cols):
            v = np.int64(er[j]) - base
            if v < 0 or v >= ESCAPE:
                esc_col[t] = j
                esc_val[t] = er[j]
                t += 1


def pack_plane(exp: np.ndarray, rows: int, cols: int, base: int | None = None, alloc=None):
    """Transcode a BF16 tensor's exponent plane into the compute form's index and escapes.

    Args:
        exp: uint8 ``[rows * cols]`` exponent plane, row-major (format/SPEC.md §5.1).
        rows, cols: the matrix shape ``[out, in]``.
        base: first exponent of the window (default :func:`window_base`).
        alloc: ``alloc(nbytes) -> uint8 [nbytes]`` for the index array (default: the C heap;
            the engine passes :func:`~zipmoe_rt.engine.io.anon_array` for cached experts).
    Returns:
        ``(base, nib uint8 [rows, (cols + 1) // 2], esc_ptr int64 [rows + 1], esc_col int32
        [n_esc], esc_val uint8 [n_esc])``.
    Raises:
        ValueError: ``exp`` does not hold ``rows * cols`` exponents, or ``base`` outside
            ``0 .. 241``.
    """
    exp = np.ascontiguousarray(exp, np.uint8).reshape(-1)
    if exp.size != rows * cols or rows < 0 or cols < 0:
        raise ValueError(f"pack_plane: {exp.size} exponents for a [{rows}, {cols}] matrix")
    if base is None:
        base = window_base(exp)
    if not 0 <= base <= 256 - WINDOW:
        raise ValueError(f"pack_plane: base {base} outside 0..{256 - WINDOW}")
    nib = (np.empty((rows, (cols + 1) // 2), np.uint8) if alloc is None
           else alloc(rows * ((cols + 1) // 2)).reshape(rows, (cols + 1) // 2))
    esc_ptr = np.empty(rows + 1, np.int64)
    n_esc = _pack(exp, rows, cols, base, nib, esc_ptr)
    esc_col = np.empty(n_esc, np.int32)
    esc_val = np.empty(n_esc, np.uint8)
    if n_esc:
        _pack_escapes(exp, rows, cols, base, esc_col, esc_val)
    return base, nib, esc_ptr, esc_col, esc_val


@njit(**JIT_SERIAL)
def split_bf16_into(words, exp, sm):
    """Split BF16 words into their exponent and sign+mantissa planes (format/SPEC.md §5.1):
    ``exp[i] = (w >> 7) & 0xFF``, ``sm[i] = (w >> 15) << 7 | (w & 0x7F)``, as
    :func:`zmoe.codec.split_planes` does, into caller-given arrays (no allocation).

    Args:
        words: uint16 [n].  exp, sm: uint8 [n], overwritten.
    """
    for i in range(words.size):
        w = words[i]
        exp[i] = np.uint8((w >> np.uint16(7)) & np.uint16(0xFF))
        sm[i] = np.uint8(((w >> np.uint16(8)) & np.uint16(0x80)) | (w & np.uint16(0x7F)))
