"""Bit-plane decoding on the GPU for the CUDA backend (format/SPEC.md §5): the plane merge
(sign+mantissa plane + exponent plane -> words) and the Huffman exponent-chunk decoder, equal
bit for bit to the host codec (:mod:`zmoe.codec`, :mod:`zmoe.huffman`,
:mod:`zipmoe_rt.kernels.planes`).

Imported by :mod:`zipmoe_rt.backends.cupy_cuda` only (it imports CuPy). Headers are parsed and
checked on the host (:func:`zmoe.huffman.parse_header`: stream sizes, complete prefix code);
the streams are decoded on the GPU, one thread per segment of a stream
(:mod:`~zipmoe_rt.backends.cuda_huffman`; one thread per stream when
``cuda_huffman.PARALLEL`` is off), and each stream's end is checked there as the host decoder
checks it.
"""
from __future__ import annotations

import numpy as np

import cupy as cp
from zmoe import huffman

from . import cuda_huffman

#: dtype -> (merge kernel, sign+mantissa bytes per element, word dtype)
MERGES = {"BF16": ("merge_bf16", 1, np.uint16), "F16": ("merge_f16", 2, np.uint16),
          "F32": ("merge_f32", 3, np.uint32)}


def merge_planes(kernels: dict, exp, sm, dtype: str):
    """Words from an exponent plane and a sign+mantissa plane, bit for bit as
    :func:`zmoe.codec.merge_planes`.

    Args:
        kernels: the backend's compiled kernels by name.  exp: uint8 [n] (host or device).
        sm: uint8 [n * sm_bytes] (1 byte for BF16, 2 for F16, 3 for F32, little-endian).
        dtype: ``"BF16"``, ``"F16"`` or ``"F32"``.
    Returns:
        device array of n words: uint16 (BF16, F16) or uint32 (F32).
    Raises:
        ValueError: another dtype, or plane sizes that disagree.
    """
    if dtype not in MERGES:
        raise ValueError(f"merge_planes: dtype {dtype!r} is not BF16, F16 or F32")
    kern, sb, wt = MERGES[dtype]
    exp = cp.ascontiguousarray(cp.asarray(exp, cp.uint8).reshape(-1))
    sm = cp.ascontiguousarray(cp.asarray(sm, cp.uint8).reshape(-1))
    n = exp.size
    if sm.size != n * sb:
        raise ValueError(f"sign+mantissa plane has {sm.size} bytes, expected {n * sb} for "
                         f"{n} {dtype}")
    out = cp.empty(n, wt)
    if n:
        blocks = min(4096, (n + 255) // 256)
        kernels[kern]((blocks,), (256,), (exp, sm, out, np.int64(n)))
    return out


def decode_tables(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(symbol, bits) of the first code in each of the 4096 12-bit windows (LSB first) of a
    complete canonical code (``lengths`` uint8 [256], validated)."""
    codes = huffman.canonical_codes(lengths)       # bit-reversed: the first bit is bit 0
    sym = np.zeros(1 << huffman.MAX_BITS, np.uint8)
    bits = np.zeros(1 << huffman.MAX_BITS, np.uint8)
    for s in np.nonzero(lengths)[0]:
        ln = int(lengths[s])
        sym[int(codes[s])::1 << ln] = s
        bits[int(codes[s])::1 << ln] = ln
    return sym, bits


def decode_exponents(kernels: dict, exp, offs, sizes, raws):
    """Decode consecutive Huffman exponent chunks (format/SPEC.md §5.3) on the GPU.

    Chunk ``i`` is ``exp[offs[i]:offs[i] + sizes[i]]`` and codes ``raws[i]`` exponents; its
    exponents follow those of chunk ``i - 1`` in the output (the layout of one tensor's chunks,
    :attr:`zipmoe_rt.engine.layout.Piece.chunk_arrays`).

    Args:
        kernels: the backend's compiled kernels.  exp: uint8 buffer holding the chunks (host,
            e.g. an expert's exponent region, or device).  offs, sizes, raws: int [m].
    Returns:
        device uint8 [Σ raws], equal byte for byte to :func:`zmoe.huffman.decode` of each chunk.
    Raises:
        ValueError: a chunk outside ``exp`` or negative sizes (names the chunk).
        zmoe.huffman.HuffmanError: a malformed chunk (names the chunk and the
            :data:`zmoe.huffman.DECODE_STATUS` failure): bad header, or a stream that does not
            decode to exactly its exponents within exactly its bytes.
    """
    offs, sizes, raws = (np.asarray(a, np.int64).reshape(-1) for a in (offs, sizes, raws))
    host = exp if isinstance(exp, np.ndarray) else None
    if host is None:
        host = cp.asnumpy(exp) if isinstance(exp, cp.ndarray) else np.frombuffer(exp, np.uint8)
    host = host.reshape(-1).view(np.uint8)
    m = offs.size
    if not (sizes.size == raws.size == m) or (offs < 0).any() or (sizes < 0).any() \
            or (raws < 0).any() or (offs + sizes > host.size).any():
        bad = next((i for i in range(m) if not (0 <= offs[i] and 0 <= sizes[i] and 0 <= raws[i]
                                                and offs[i] + sizes[i] <= host.size)), 0)
        raise ValueError(f"exponent chunk {bad}: outside the {host.size}-byte buffer or of "
                         f"negative size")
    starts = np.concatenate([[0], np.cumsum(raws)])
    keys: dict = {}
    syms, bits = [], []
    rows = []          # per stream: src start, size, out start, count, table
    for i in range(m):
        chunk = host[offs[i]:offs[i] + sizes[i]]
        try:
            lengths, spans = huffman.parse_header(chunk, int(raws[i]))
        except huffman.HuffmanError as e:
            raise huffman.HuffmanError(f"exponent chunk {i}: {e}") from None
        if raws[i] == 0:
            if any(size for _, size in spans):
                raise huffman.HuffmanError(f"exponent chunk {i}: {huffman.DECODE_STATUS[3]}")
            continue
        key = chunk[:huffman.LENGTHS_BYTES].tobytes()
        if key not in keys:
            keys[key] = len(syms)
            s, b = decode_tables(lengths)
            syms.append(s)
            bits.append(b)
        for (so, size), (a, b) in zip(spans, huffman.stream_ranges(int(raws[i]))):
            rows.append((offs[i] + so, size, starts[i] + a, b - a, keys[key], i))
    out = cp.empty(int(starts[-1]), cp.uint8)
    if not rows:
        return out
    r = np.array(rows, np.int64)
    dev = cp.asarray(host) if not isinstance(exp, cp.ndarray) else cp.asarray(exp).reshape(-1)
    if cuda_huffman.PARALLEL:     # one thread per segment of a stream (cuda_huffman.py)
        st = cuda_huffman.decode_streams(dev, r, cp.asarray(np.concatenate(syms)),
                                         cp.asarray(np.concatenate(bits)), out)
        if st.any():
            j = int(np.nonzero(st)[0][0])
            raise huffman.HuffmanError(f"exponent chunk {int(r[j, 5])}: "
                                       f"{huffman.DECODE_STATUS[int(st[j])]}")
        return out
    status = cp.zeros(len(rows), cp.int32)
    n = len(rows)
    kernels["huffman_streams"](((n + 127) // 128,), (128,),
                               (dev, cp.asarray(r[:, 0]), cp.asarray(r[:, 1]),
                                cp.asarray(r[:, 2]), cp.asarray(r[:, 3]),
                                cp.asarray(r[:, 4].astype(np.int32)),
                                cp.asarray(np.concatenate(syms)),
                                cp.asarray(np.concatenate(bits)), out, status, np.int32(n)))
    st = cp.asnumpy(status)
    if st.any():
        j = int(np.nonzero(st)[0][0])
        raise huffman.HuffmanError(f"exponent chunk {int(r[j, 5])}: "
                                   f"{huffman.DECODE_STATUS[int(st[j])]}")
    return out
