"""Nibble bit-planes of FP8 E4M3 words (format/SPEC.md §5.1, "F8_E4M3").

An E4M3 byte is ``sign (1) | exponent (4) | mantissa (3)`` (OCP 8-bit floating point
specification, the ``float8_e4m3fn`` of PyTorch and safetensors' ``F8_E4M3``). The split carries
the bit-plane idea of ZipMoE (arXiv 2601.21198 §3.1) over to 4-bit exponents:

- the **exponent plane**: one byte per element, ``e = (w >> 3) & 0xF`` (entropy-coded in chunks
  exactly like the exponents of BF16, SPEC §5.2-§5.3);
- the **sign+mantissa (SM) plane**: ``s = (w >> 7) << 3 | (w & 7)``, 4 bits per element, packed
  two per byte: element ``2i`` in the low nibble of byte ``i``, element ``2i + 1`` in its high
  nibble; an odd count leaves the last high nibble zero.

The inverse ``w = (s >> 3) << 7 | e << 3 | (s & 7)`` puts every bit back: all 256 patterns
round-trip (±0, subnormals, the two NaNs ``0x7F`` / ``0xFF``). Plain numpy: the reference for the
runtime's Numba kernel (``zipmoe_rt.kernels.lowprec``).
"""
from __future__ import annotations

import numpy as np


def sm_bytes(n: int) -> int:
    """Bytes of the packed SM plane of ``n`` elements: ``ceil(n / 2)``."""
    return (int(n) + 1) // 2


def split(words) -> tuple[np.ndarray, np.ndarray]:
    """Split E4M3 bytes into planes.

    Args:
        words: bytes-like or array whose bytes are the E4M3 elements (C order).

    Returns:
        ``(exp, sm)``: exp uint8 [n] (values 0..15); sm uint8 [ceil(n / 2)], two 4-bit
        ``sign << 3 | mantissa`` values per byte (low nibble first).
    """
    w = np.ascontiguousarray(words).reshape(-1).view(np.uint8) if isinstance(words, np.ndarray) \
        else np.frombuffer(memoryview(words).cast("B"), np.uint8)
    n = w.size
    exp = (w >> 3) & 0x0F
    nib = ((w >> 4) & 0x08) | (w & 0x07)
    sm = np.zeros(sm_bytes(n), np.uint8)
    sm[:] = nib[0::2]
    sm[:n // 2] |= nib[1::2] << 4
    return exp.astype(np.uint8, copy=False), sm


def unpack_sm(sm, n: int) -> np.ndarray:
    """The ``n`` 4-bit SM values of a packed plane, one per byte (uint8 [n]).

    Raises:
        ValueError: the plane does not have ``ceil(n / 2)`` bytes.
    """
    sm = np.frombuffer(sm, np.uint8) if not isinstance(sm, np.ndarray) else sm.reshape(-1)
    if sm.size != sm_bytes(n):
        raise ValueError(f"sign+mantissa plane has {sm.size} bytes, expected {sm_bytes(n)} for "
                         f"{n} F8_E4M3 (two per byte)")
    out = np.empty(2 * sm.size, np.uint8)
    out[0::2] = sm & 0x0F
    out[1::2] = sm >> 4
    return out[:n]


def merge_unpacked(exp: np.ndarray, nib: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """E4M3 bytes from exponents and unpacked SM values (one per byte), both uint8 [n].

    Raises:
        ValueError: an exponent above 15 (a corrupt plane).
    """
    exp = np.asarray(exp, np.uint8).reshape(-1)
    if exp.size and int(exp.max()) > 15:
        raise ValueError(f"exponent {int(exp.max())} above 15 in an F8_E4M3 plane")
    if out is None:
        out = np.empty(exp.size, np.uint8)
    np.bitwise_or(((nib & 0x08) << 4) | (nib & 0x07), (exp & 0x0F) << 3, out=out)
    return out


def merge(exp, sm, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`split`: uint8 [n] E4M3 bytes (into ``out`` if given).

    Raises:
        ValueError: plane sizes that do not match (``ceil(n / 2)`` SM bytes for n exponents), or
            an ``out`` that is not a contiguous uint8 array of n.
    """
    exp = np.frombuffer(exp, np.uint8) if not isinstance(exp, np.ndarray) else exp.reshape(-1)
    n = exp.size
    if out is not None and (out.dtype != np.uint8 or out.size != n or not out.flags.c_contiguous):
        raise ValueError(f"out: expected a contiguous uint8 array of {n} bytes, got {out.dtype} "
                         f"{out.shape}")
    return merge_unpacked(exp, unpack_sm(sm, n), out)


#: E4M3 byte -> float32 value (exact: every E4M3 value is a float32), NaN for 0x7F and 0xFF
def _table() -> np.ndarray:
    b = np.arange(256, dtype=np.uint32)
    s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
    mag = np.where(e == 0, m.astype(np.float64) * 2.0 ** -9,
                   (1 + m.astype(np.float64) / 8) * 2.0 ** (e.astype(np.float64) - 7))
    v = np.where(s == 1, -mag, mag)
    v[(e == 15) & (m == 7)] = np.nan
    return v.astype(np.float32)


E4M3_TO_F32 = _table()


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """NumPy reference of the block dequantisation of FP8 weights: float32
    ``E4M3_TO_F32[q[r, c]] * scale[r // bm, c // bn]`` (one float32 product per weight, as
    transformers' ``Fp8Dequantize``; the runtime's Numba kernel gives the same bits).

    Args:
        q: uint8 [R, C] E4M3 bytes.  scale: float32 [ceil(R / bm), ceil(C / bn)].
        block: (bm, bn).
    Raises:
        ValueError: a scale grid that does not fit the weight and the block.
    """
    bm, bn = int(block[0]), int(block[1])
    R, C = q.shape
    if scale.shape != (-(-R // bm), -(-C // bn)):
        raise ValueError(f"scale shape {list(scale.shape)}, but a {[R, C]} weight in blocks of "
                         f"{[bm, bn]} needs {[-(-R // bm), -(-C // bn)]}")
    s = np.repeat(np.repeat(np.asarray(scale, np.float32), bm, 0), bn, 1)[:R, :C]
    return E4M3_TO_F32[np.asarray(q, np.uint8)] * s
