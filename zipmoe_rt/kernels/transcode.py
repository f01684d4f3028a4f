"""The transcoder of the compute form (design note §6.5): a BF16 tensor's exponent plane into a
4-bit index into the window of 15 consecutive exponents that holds most of them, and an escape
list for the rest (layout: :mod:`zipmoe_rt.kernels.packed`). Single-threaded and ``nogil``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .linear import JIT_SERIAL

__all__ = ["window_base", "pack_plane", "ESCAPE", "WINDOW"]

#: exponents a 4-bit index covers (``base .. base + 14``); index 15 marks an escape.
WINDOW = 15
ESCAPE = 15


# ---------------------------------------------------------------------------------------------
# transcoder


def window_base(exp: np.ndarray) -> int:
    """The ``base`` whose window ``base .. base + 14`` holds the most exponents of ``exp``.

    Args:
        exp: uint8 exponent plane (any shape).
    Returns:
        int in ``0 .. 241`` (ties: the lowest base).
    """
    h = np.bincount(np.asarray(exp, np.uint8).reshape(-1), minlength=256).astype(np.int64)
    c = np.convolve(h, np.ones(WINDOW, np.int64), "valid")   # c[b] = sum h[b : b + 15]
    return int(np.argmax(c))


@njit(**JIT_SERIAL)
def _pack(exp, rows, cols, base, nib, esc_ptr):
    """nib (escapes as 15) and per-row escape counts -> esc_ptr prefix sums; returns total."""
    h = (cols + 1) >> 1
    total = 0
    for r in range(rows):
        esc_ptr[r] = total
        er = exp[r * cols:(r + 1) * cols]
        nr = nib[r]
        for j in range(h):
            nr[j] = 0
        for j in range(cols):
            v = np.int64(er[j]) - base
            if v < 0 or v >= ESCAPE:
                v = ESCAPE
                total += 1
            if j < h:
                nr[j] |= np.uint8(v)
            else:
                nr[j - h] |= np.uint8(v << 4)
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


def pack_plane(exp: np.ndarray, rows: int, cols: int, base: int | None = None):
    """Transcode a BF16 tensor's exponent plane into the compute form's index and escapes.

    Args:
        exp: uint8 ``[rows * cols]`` exponent plane, row-major (format/SPEC.md §5.1).
        rows, cols: the matrix shape ``[out, in]``.
        base: first exponent of the window (default :func:`window_base`).
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
    nib = np.empty((rows, (cols + 1) // 2), np.uint8)
    esc_ptr = np.empty(rows + 1, np.int64)
    n_esc = _pack(exp, rows, cols, base, nib, esc_ptr)
    esc_col = np.empty(n_esc, np.int32)
    esc_val = np.empty(n_esc, np.uint8)
    if n_esc:
        _pack_escapes(exp, rows, cols, base, esc_col, esc_val)
    return base, nib, esc_ptr, esc_col, esc_val
