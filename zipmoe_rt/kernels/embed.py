"""Embedding lookup: rows of a BF16 / F16 / F32 table widened to float32 on the fly, without an
fp32 copy of the table (``nn.Embedding`` on the stored weights). Single-threaded, ``nogil``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .linear import JIT_SERIAL, weight_kind
from .widen import bf16_to_f32, f16_to_f32

__all__ = ["bf16_rows"]


@njit(**JIT_SERIAL)
def _rows_bf16(W, ids, out):
    for i in range(ids.shape[0]):
        row = W[ids[i]]
        o = out[i]
        for j in range(W.shape[1]):
            o[j] = bf16_to_f32(row[j])


@njit(**JIT_SERIAL)
def _rows_f16(W, ids, out):
    for i in range(ids.shape[0]):
        row = W[ids[i]]
        o = out[i]
        for j in range(W.shape[1]):
            o[j] = f16_to_f32(row[j])


def bf16_rows(W: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Rows ``W[ids]`` widened to float32 on the fly (embedding lookup without an fp32 table).

    Args:
        W: [V, H] uint16 (BF16), float16 or float32.
        ids: int64 [T], each in [0, V).
    Returns:
        float32 [T, H].
    Raises:
        IndexError: an id outside [0, V).
        TypeError: unsupported dtype.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
        raise IndexError(f"token id out of range [0, {W.shape[0]})")
    kind = weight_kind(W)
    if kind == "f32":
        return np.ascontiguousarray(W[ids])
    out = np.empty((ids.shape[0], W.shape[1]), np.float32)
    (_rows_bf16 if kind == "bf16" else _rows_f16)(W.view(np.uint16), ids, out)
    return out
