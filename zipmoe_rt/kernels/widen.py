"""Exact widening of 16-bit floats to float32 inside the Numba kernels: BF16 bits (``uint16``,
``float32 bits = bf16 bits << 16``) and IEEE half bits, one element or whole weight rows from
any row source of :mod:`zipmoe_rt.kernels.rows`; and :func:`widen_bf16`, the NumPy version for
tests and small vectors. The dense kernels of :mod:`zipmoe_rt.kernels.linear` and the expert
kernels build on these.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .rows import row_of

__all__ = ["bf16_to_f32", "f16_to_f32", "widen_rows_bf16", "widen_bf16"]


@njit(inline="always")
def bf16_to_f32(h):
    """BF16 bits (uint16) -> float32, exact."""
    return np.uint32(np.uint32(h) << 16).view(np.float32)


@njit(inline="always")
def f16_to_f32(h):
    """IEEE half bits (uint16) -> float32, exact incl. subnormals, inf and NaN."""
    h32 = np.uint32(h)
    em = h32 & np.uint32(0x7FFF)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    if em >= np.uint32(0x7C00):
        bits = (em << np.uint32(13)) | np.uint32(0x7F800000)
    else:
        # exponent field moved into float32's, rebias by multiplying with 2**112 (exact)
        f = np.uint32(em << np.uint32(13)).view(np.float32) * np.float32(5.192296858534828e33)
        bits = np.float32(f).view(np.uint32)
    return np.uint32(bits | sign).view(np.float32)


@njit(inline="always")
def widen_rows_bf16(W, r0, r1, buf, s):
    """buf[:r1-r0] = float32 of the BF16 rows r0 .. r1-1 of W (any row source of
    :mod:`zipmoe_rt.kernels.rows`; exact widening); ``s``: uint16 scratch rows for a source
    that must be decoded."""
    for r in range(r0, r1):
        row = row_of(W, r, s[r - r0])
        b = buf[r - r0]
        for j in range(row.shape[0]):
            b[j] = bf16_to_f32(row[j])


def widen_bf16(W: np.ndarray) -> np.ndarray:
    """BF16 bits -> float32 copy (exact). For tests and small vectors (norm weights, biases);
    the model never widens whole matrices.

    Args:
        W: uint16 array of any shape.
    Returns:
        float32 array, same shape.
    """
    W = np.ascontiguousarray(W)
    if W.dtype != np.uint16:
        raise TypeError(f"widen_bf16 wants uint16 BF16 bits, got {W.dtype}")
    return (W.astype(np.uint32) << np.uint32(16)).view(np.float32)

