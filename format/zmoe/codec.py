"""Bit-plane codec: split floating-point words into an exponent plane and a sign+mantissa plane,
entropy-code the exponent plane in independent chunks, Huffman (SPEC §5.3) or zstd
(format/SPEC.md §5; ZipMoE arXiv 2601.21198 §3.1).

This is the reference implementation in plain numpy; the runtime has a faster fused Numba merge.
All functions are lossless for every bit pattern (NaN payloads, infinities, -0.0, subnormals).
"""
from __future__ import annotations

import numpy as np
import zstandard as zstd

from . import fp8, huffman
from .constants import (BITPLANE_DTYPES, DEFAULT_EXP_CODEC, EXP_CODECS, EXP_HUFFMAN,
                        EXPONENT_ONLY_DTYPES, MIN_CHUNK, NIBBLE_PLANE_DTYPES)

_WORD = {2: np.uint16, 4: np.uint32}


def zstd_parameters() -> zstd.ZstdCompressionParameters:
    """zstd parameters for exponent planes (SPEC §5.2).

    A fast strategy with a long minimum match and a tiny hash table leaves almost only
    Huffman-coded literals: measured on SmolLM2 MLP weights, 2.60 bits per exponent at
    ~1.4 G exponents/s decode per core, against 3.0 bits and ~1.0 G/s for level 1.
    """
    return zstd.ZstdCompressionParameters(
        strategy=zstd.STRATEGY_FAST, window_log=17, chain_log=6, hash_log=6, search_log=1,
        min_match=7, target_length=0, write_content_size=True, write_checksum=False)


def is_bitplane_dtype(dtype: str) -> bool:
    """True for dtypes the bit-plane encoding supports (BF16, F16, F32; F8_E4M3 with a
    nibble-packed SM plane, SPEC §5.1)."""
    return dtype in BITPLANE_DTYPES or dtype in NIBBLE_PLANE_DTYPES


def has_planes(dtype: str) -> bool:
    """True for every dtype with a bit-plane layout (SPEC §5.1): :func:`is_bitplane_dtype`'s and
    the exponent-only U8 (MXFP4 scales, bit-plane coded only when asked for)."""
    return is_bitplane_dtype(dtype) or dtype in EXPONENT_ONLY_DTYPES


def sm_plane_bytes(dtype: str, n: int) -> int:
    """Bytes of the SM plane of ``n`` elements of ``dtype`` (SPEC §5.1): ``n`` x SM bytes,
    ``ceil(n / 2)`` for F8_E4M3, 0 for the exponent-only U8.

    Raises:
        ValueError: a dtype without a bit-plane layout.
    """
    if dtype in NIBBLE_PLANE_DTYPES:
        return fp8.sm_bytes(n)
    if dtype in EXPONENT_ONLY_DTYPES:
        return 0
    return int(n) * _planes_layout(dtype)[3]


#: elements converted per step by :func:`split_planes` and :func:`merge_planes`: their
#: temporaries are two word arrays of this many elements (2 MiB for F32), whatever the tensor's
#: size, so a multi-GB tensor splits and merges in its planes' memory plus this
STREAM_ELEMENTS = 1 << 18


def _planes_layout(dtype: str):
    if dtype not in BITPLANE_DTYPES:
        raise ValueError(f"bit-plane encoding does not support dtype {dtype!r}")
    return BITPLANE_DTYPES[dtype]


def split_planes(words: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Split words into planes.

    Streams: the two planes are allocated once and filled :data:`STREAM_ELEMENTS` words at a
    time, so the memory used is the planes (1x the input's bytes for BF16 and F32, 1.5x for
    F16) plus two blocks of words, however large the tensor.

    Args:
        words: any array whose bytes are little-endian elements of ``dtype`` (uint8 bytes, the
            uint16/uint32 words, or float16/float32 values); read in C order (a non-contiguous
            array is copied first).
        dtype: ``"BF16"``, ``"F16"`` or ``"F32"``.

    Returns:
        ``(exp, sm)``: exp is uint8 [n] (the biased exponent field); sm is uint8
        [n * sm_bytes] holding ``sign << mant_bits | mantissa`` little-endian per element.

    Raises:
        ValueError: unsupported dtype or a byte count not a multiple of the word size.

    F8_E4M3 (:mod:`zmoe.fp8`): exp uint8 [n] (0..15), sm uint8 [ceil(n / 2)], two 4-bit values
    per byte.
    """
    if dtype in NIBBLE_PLANE_DTYPES:
        return fp8.split(words)
    if dtype in EXPONENT_ONLY_DTYPES:   # every byte is an exponent, no SM plane
        return np.array(np.ascontiguousarray(words).reshape(-1).view(np.uint8)) \
            if isinstance(words, np.ndarray) else np.frombuffer(bytes(words), np.uint8).copy(), \
            np.zeros(0, np.uint8)
    eb, mb, wb, sb = _planes_layout(dtype)
    raw = np.ascontiguousarray(words).reshape(-1).view(np.uint8)
    if raw.size % wb:
        raise ValueError(f"{raw.size} bytes is not a whole number of {dtype} elements")
    wt = _WORD[wb]
    w = raw.view(wt)
    n = w.size
    exp = np.empty(n, np.uint8)
    sm = np.empty(n * sb, np.uint8)
    sm_words = sm.view(np.uint16) if sb == 2 else sm.reshape(-1, 3) if sb == 3 else sm
    step = min(n, STREAM_ELEMENTS)
    u, v = np.empty(step, wt), np.empty(step, wt)
    emask, mmask = wt((1 << eb) - 1), wt((1 << mb) - 1)
    for a in range(0, n, STREAM_ELEMENTS):
        b = min(n, a + STREAM_ELEMENTS)
        x, uu, vv = w[a:b], u[:b - a], v[:b - a]
        np.right_shift(x, mb, out=uu)
        np.bitwise_and(uu, emask, out=uu)
        exp[a:b] = uu
        np.right_shift(x, eb + mb, out=uu)              # sign
        np.left_shift(uu, mb, out=uu)
        np.bitwise_and(x, mmask, out=vv)
        np.bitwise_or(uu, vv, out=uu)
        if sb == 3:   # the low 3 bytes of each little-endian uint32
            sm_words[a:b] = uu.view(np.uint8).reshape(-1, 4)[:, :3]
        else:
            sm_words[a:b] = uu
    return exp, sm


def merge_planes(exp: np.ndarray, sm: np.ndarray, dtype: str,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`split_planes`.

    Streams like :func:`split_planes`: the words are written :data:`STREAM_ELEMENTS` at a time
    into one output array, so the memory used is the output plus two blocks of words.

    Args:
        exp: uint8 [n] exponent plane (or a bytes-like object).
        sm: uint8 [n * sm_bytes] sign+mantissa plane (or a bytes-like object).
        dtype: ``"BF16"``, ``"F16"`` or ``"F32"``.
        out: optional C-contiguous array of n words (uint16 for BF16/F16, uint32 for F32) to
            write into (e.g. a slice of a whole tensor's words, for chunk-by-chunk merging).

    Returns:
        1-D array of the words: uint16 for BF16/F16, uint32 for F32 (``out`` when given).

    Raises:
        ValueError: unsupported dtype, plane sizes that do not match each other, or an ``out``
            of the wrong dtype or size.

    F8_E4M3: uint8 bytes from the nibble-packed SM plane (:func:`zmoe.fp8.merge`).
    """
    if dtype in NIBBLE_PLANE_DTYPES:
        return fp8.merge(exp, sm, out)
    if dtype in EXPONENT_ONLY_DTYPES:
        exp = np.frombuffer(exp, np.uint8) if not isinstance(exp, np.ndarray) else exp.reshape(-1)
        if len(sm):
            raise ValueError(f"sign+mantissa plane has {len(sm)} bytes, expected 0 for {dtype}")
        out = np.empty(exp.size, np.uint8) if out is None else out
        out[:] = exp
        return out
    eb, mb, wb, sb = _planes_layout(dtype)
    exp = np.frombuffer(exp, np.uint8) if not isinstance(exp, np.ndarray) else exp.reshape(-1)
    sm = np.frombuffer(sm, np.uint8) if not isinstance(sm, np.ndarray) else sm.reshape(-1)
    n = exp.size
    if sm.size != n * sb:
        raise ValueError(f"sign+mantissa plane has {sm.size} bytes, expected {n * sb} for {n} {dtype}")
    wt = _WORD[wb]
    if out is None:
        out = np.empty(n, wt)
    elif out.dtype != wt or out.size != n or not out.flags.c_contiguous:
        raise ValueError(f"out: expected a contiguous {np.dtype(wt).name} array of {n} words, "
                         f"got {out.dtype} {out.shape}")
    words = out.reshape(-1)
    sm_words = sm.view(np.uint16) if sb == 2 else sm.reshape(-1, 3) if sb == 3 else sm
    step = min(n, STREAM_ELEMENTS)
    u, v = np.empty(step, wt), np.empty(step, wt)
    mmask = wt((1 << mb) - 1)
    for a in range(0, n, STREAM_ELEMENTS):
        b = min(n, a + STREAM_ELEMENTS)
        uu, vv = u[:b - a], v[:b - a]
        if sb == 3:   # 3 little-endian bytes into the low bytes of each uint32
            ub = uu.view(np.uint8).reshape(-1, 4)
            ub[:, :3] = sm_words[a:b]
            ub[:, 3] = 0
        else:
            uu[:] = sm_words[a:b]                     # sign << mant_bits | mantissa
        np.right_shift(uu, mb, out=vv)                # sign
        np.left_shift(vv, eb + mb, out=vv)
        np.bitwise_and(uu, mmask, out=uu)
        np.bitwise_or(uu, vv, out=uu)
        vv[:] = exp[a:b]
        np.left_shift(vv, mb, out=vv)
        np.bitwise_or(uu, vv, out=words[a:b])
    return out


def merge_chunks(chunks, raw_sizes, sm, dtype: str, exp_codec: str = DEFAULT_EXP_CODEC,
                 decompressor: zstd.ZstdDecompressor | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Decode exponent chunks and merge each with its slice of the sign+mantissa plane, one
    chunk at a time (:func:`decompress_chunk`, then :func:`merge_planes` into the output).

    The memory used is the output words plus one chunk's exponents and two blocks of words,
    instead of the whole exponent plane and the temporaries of a whole-tensor merge.

    Args:
        chunks: the exponent chunks (bytes-like), in order.
        raw_sizes: exponents in each chunk (ints).
        sm: uint8 [n * sm_bytes] sign+mantissa plane, n = ``sum(raw_sizes)``.
        dtype, exp_codec, decompressor: as for :func:`merge_planes` and :func:`decompress_chunk`.
        out: optional array of n words to write into.

    Returns:
        1-D array of the words: uint16 for BF16/F16, uint32 for F32, uint8 for F8_E4M3.

    Raises:
        ValueError: an unknown codec or dtype, a chunk that does not decode to its recorded
            size (the message starts with ``exponent chunk i:``), or raw sizes that do not add
            up to the sign+mantissa plane's elements.
    """
    check_codec(exp_codec)
    nibble = dtype in NIBBLE_PLANE_DTYPES
    wb, sb = (1, 1) if nibble else (1, 0) if dtype in EXPONENT_ONLY_DTYPES \
        else _planes_layout(dtype)[2:]
    sizes = [int(r) for r in raw_sizes]
    sm = np.frombuffer(sm, np.uint8) if not isinstance(sm, np.ndarray) else sm.reshape(-1)
    n = sum(sizes)
    if len(sizes) != len(chunks) or any(r < 0 for r in sizes) or sm.size != sm_plane_bytes(dtype, n):
        raise ValueError(f"exponent chunks of {sizes} exponents do not match a sign+mantissa "
                         f"plane of {sm.size} bytes ({sm.size / sb:g} {dtype})")
    if out is None:
        out = np.empty(n, np.uint8 if wb == 1 else _WORD[wb])
    buf = np.empty(max(sizes, default=0), np.uint8)
    nib = fp8.unpack_sm(sm, n) if nibble else None   # chunks may start on an odd element
    pos = 0
    for i, (c, r) in enumerate(zip(chunks, sizes)):
        try:
            e = decompress_chunk(c, r, exp_codec, decompressor, buf[:r])
        except ValueError as err:
            raise type(err)(f"exponent chunk {i}: {err}") from None
        if nibble:
            fp8.merge_unpacked(e, nib[pos:pos + r], out[pos:pos + r])
        else:
            merge_planes(e, sm[pos * sb:(pos + r) * sb], dtype, out=out[pos:pos + r])
        pos += r
    return out


def chunk_bounds(n: int, chunks: int, min_chunk: int = MIN_CHUNK) -> list[tuple[int, int]]:
    """Cut ``n`` exponents into at most ``chunks`` near-equal ranges of at least ``min_chunk``
    (fewer chunks for small tensors; at least one). Returns [(begin, end), ...]."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    k = max(1, min(chunks, n // max(1, min_chunk)))
    step = -(-n // k) if n else 0
    return [(i, min(n, i + step)) for i in range(0, n, step)] if n else [(0, 0)]


def check_codec(exp_codec: str) -> None:
    """Check an exponent-chunk codec name (SPEC §5.2: ``huffman`` or ``zstd``).

    Raises:
        ValueError: a name outside :data:`zmoe.constants.EXP_CODECS` (the known ones listed).
    """
    if exp_codec not in EXP_CODECS:
        raise ValueError(f"unknown exponent codec {exp_codec!r} (known: {', '.join(EXP_CODECS)})")


#: the former private name, still called by writer.py
_check_codec = check_codec


def compress_chunks(exp: np.ndarray, chunks: int, min_chunk: int = MIN_CHUNK,
                    compressor: zstd.ZstdCompressor | None = None,
                    exp_codec: str = DEFAULT_EXP_CODEC) -> list[tuple[bytes, int]]:
    """Compress an exponent plane as independent chunks (SPEC §5.2).

    Args:
        exp: uint8 [n] exponent plane.
        chunks, min_chunk: see :func:`chunk_bounds`.
        compressor: zstd compressor to reuse (``zstd`` codec only).
        exp_codec: ``huffman`` (SPEC §5.3: every chunk of the plane uses the plane's code, so a
            decoder builds its table once) or ``zstd``.

    Returns:
        [(chunk bytes, raw_size)] in order; each chunk decodes alone.

    Raises:
        ValueError: an unknown codec.
    """
    return list(iter_compress_chunks(exp, chunks, min_chunk, compressor, exp_codec))


def iter_compress_chunks(exp: np.ndarray, chunks: int, min_chunk: int = MIN_CHUNK,
                         compressor: zstd.ZstdCompressor | None = None,
                         exp_codec: str = DEFAULT_EXP_CODEC):
    """:func:`compress_chunks` one chunk at a time: yields ``(chunk bytes, raw_size)`` in order,
    so a writer can store each chunk before the next is made (memory: one compressed chunk).

    Raises:
        ValueError: an unknown codec (when the first chunk is asked for).
    """
    check_codec(exp_codec)
    buf = np.ascontiguousarray(exp).reshape(-1).view(np.uint8)
    bounds = chunk_bounds(len(buf), chunks, min_chunk)
    if exp_codec == EXP_HUFFMAN:
        lengths = huffman.code_lengths(huffman.histogram(buf))
        for a, b in bounds:
            yield huffman.encode(buf[a:b], lengths), b - a
        return
    c = compressor or zstd.ZstdCompressor(compression_params=zstd_parameters())
    mv = memoryview(buf)
    for a, b in bounds:
        yield c.compress(mv[a:b]), b - a


def split_compress(words: np.ndarray, dtype: str, chunks: int, min_chunk: int = MIN_CHUNK,
                   compressor: zstd.ZstdCompressor | None = None,
                   exp_codec: str = DEFAULT_EXP_CODEC) -> tuple[np.ndarray, list[tuple[bytes, int]]]:
    """:func:`split_planes` then :func:`compress_chunks`, chunk by chunk: the exponent plane is
    never held whole, so the memory used is the sign+mantissa plane (1/2 of the input's bytes
    for BF16, 1x for F16, 3/4 for F32), the compressed chunks and one chunk's planes. The
    result is byte-identical to ``compress_chunks(split_planes(words)[0])`` (the Huffman code is
    the whole plane's: a first pass counts the exponents chunk by chunk).

    Args:
        words, dtype: as :func:`split_planes`.  chunks, min_chunk, compressor, exp_codec: as
            :func:`compress_chunks`.
    Returns:
        ``(sm, [(chunk bytes, raw_size)])``.
    Raises:
        ValueError: as :func:`split_planes` and :func:`compress_chunks`.
    """
    check_codec(exp_codec)
    if dtype in NIBBLE_PLANE_DTYPES or dtype in EXPONENT_ONLY_DTYPES:   # 1-byte words
        exp, sm = split_planes(words, dtype)
        return sm, compress_chunks(exp, chunks, min_chunk, compressor, exp_codec)
    eb, mb, wb, sb = _planes_layout(dtype)
    raw = np.ascontiguousarray(words).reshape(-1).view(np.uint8)
    if raw.size % wb:
        raise ValueError(f"{raw.size} bytes is not a whole number of {dtype} elements")
    n = raw.size // wb
    bounds = chunk_bounds(n, chunks, min_chunk)
    sm = np.empty(n * sb, np.uint8)
    lengths = None
    if exp_codec == EXP_HUFFMAN:
        hist = np.zeros(256, np.int64)
        for a, b in bounds:
            hist += huffman.histogram(split_planes(raw[a * wb:b * wb], dtype)[0])
        lengths = huffman.code_lengths(hist)
    else:
        c = compressor or zstd.ZstdCompressor(compression_params=zstd_parameters())
    out = []
    for a, b in bounds:
        exp, part = split_planes(raw[a * wb:b * wb], dtype)
        sm[a * sb:b * sb] = part
        del part
        out.append((huffman.encode(exp, lengths) if lengths is not None
                    else c.compress(memoryview(exp)), b - a))
    return sm, out


def decompress_chunk(chunk, raw_size: int, exp_codec: str = DEFAULT_EXP_CODEC,
                     decompressor: zstd.ZstdDecompressor | None = None,
                     out: np.ndarray | None = None) -> np.ndarray:
    """Decode one exponent chunk to uint8 [raw_size] (into ``out`` if given).

    Nothing is allocated from what the chunk claims: a zstd frame must declare exactly
    ``raw_size`` bytes of content (checked from its header before decompressing, which would
    allocate the declared size) and be the whole chunk; a Huffman chunk decodes into
    ``raw_size`` bytes (:func:`zmoe.huffman.decode`).

    Raises:
        ValueError: an unknown codec, or a chunk that does not decode to exactly ``raw_size``
            exponents (corruption).
    """
    check_codec(exp_codec)
    if exp_codec == EXP_HUFFMAN:
        return huffman.decode(chunk, raw_size, out)
    d = decompressor or zstd.ZstdDecompressor()
    try:
        # the frame's declared size is what zstd would allocate: compare it with raw_size first
        declared = zstd.get_frame_parameters(chunk).content_size
        if declared != raw_size:
            shown = "no size" if declared == zstd.CONTENTSIZE_UNKNOWN else f"{declared} bytes"
            raise ValueError(f"zstd frame declares {shown}, expected raw_size {raw_size} "
                             f"(SPEC §5.2: one frame with its content size)")
        b = d.decompress(chunk, max_output_size=raw_size, allow_extra_data=False)
    except zstd.ZstdError as e:
        raise ValueError(f"corrupt exponent chunk: {e}") from None
    if len(b) != raw_size:
        raise ValueError(f"exponent chunk decoded to {len(b)} bytes, expected {raw_size}")
    e = np.frombuffer(b, np.uint8)
    if out is None:
        return e
    out[:] = e
    return out


def decompress_chunks(frames, raw_sizes, decompressor: zstd.ZstdDecompressor | None = None,
                      exp_codec: str = DEFAULT_EXP_CODEC) -> np.ndarray:
    """Decode chunks from :func:`compress_chunks` back into one uint8 exponent plane.

    Raises:
        ValueError: an unknown codec, or a chunk that does not decode to its recorded size
            (the message starts with ``exponent chunk i:``).
    """
    out = np.empty(sum(raw_sizes), np.uint8)
    pos = 0
    for i, (f, n) in enumerate(zip(frames, raw_sizes)):
        try:
            decompress_chunk(f, n, exp_codec, decompressor, out[pos:pos + n])
        except ValueError as e:
            raise type(e)(f"exponent chunk {i}: {e}") from None
        pos += n
    return out
