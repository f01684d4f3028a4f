"""Order-0 canonical Huffman coding of exponent planes in four interleaved streams
(format/SPEC.md §5.3).

The exponent byte of trained weights carries ~2.6 bits of information (ZipMoE, arXiv
2601.21198 §3.1; DFloat11 and ZipNN also Huffman-code it). A length-limited (≤ 12 bits) canonical
Huffman code gets within ~0.05 bit of the order-0 entropy, and a decoder that looks up 12 bits at
a time and emits every whole code they hold (≈ 4.5 exponents per lookup on real weights) over
four independent bit streams decodes ~3 G exponents/s per core, about twice zstd's speed on the
same data.

This module is plain numpy + Python: the reference encoder and decoder. When Numba is importable,
:func:`encode` and :func:`decode` use the compiled kernels of :mod:`zmoe._huffjit` (same
results, bit for bit; the tests check one against the other). The pure-Python decoder runs at
a few M exponents/s: fine for tests and small files, slow for a whole model.

Chunk layout (SPEC §5.3)::

    lengths   128 bytes   code length of symbol s in the low nibble of byte s // 2 if s is even,
                          the high nibble if odd (0 = symbol absent, 1..12)
    sizes     4 x u32 LE  byte length of each of the 4 streams
    stream 0, 1, 2, 3     back to back

Stream ``s`` codes the exponents ``[s * q, min(n, (s + 1) * q))`` with ``q = ceil(n / 4)``. Codes
are packed least-significant bit first (bit ``j`` of a stream is bit ``j % 8`` of its byte
``j // 8``), each code's first (most significant) bit first; the last byte is zero-padded.
"""
from __future__ import annotations

import struct
import threading

import numpy as np

MAX_BITS = 12
STREAMS = 4
LENGTHS_BYTES = 128
HEADER_BYTES = LENGTHS_BYTES + 4 * STREAMS
#: Most codes one decode-table entry holds (6 symbol bytes + count + bits in a uint64).
MAX_SYMS_PER_ENTRY = 6
#: Status codes of the compiled decoder (:func:`decode_into`) -> message; 0 is success.
DECODE_STATUS = {
    1: "code lengths above 12 bits or not a complete prefix code",
    2: "stream sizes do not add up to the chunk",
    3: "a stream does not decode to exactly its exponents within exactly its bytes",
    4: "chunk shorter than its header",
}

_JIT = []   # [module or None] once resolved


def _jit():
    """The optional Numba accelerator :mod:`zmoe._huffjit`, or None without Numba (imported on
    first use: importing Numba takes a moment)."""
    if not _JIT:
        try:
            from . import _huffjit
        except ImportError:  # pragma: no cover - exercised only without numba
            _huffjit = None
        _JIT.append(_huffjit)
    return _JIT[0]


_tls = threading.local()


def table_cache():
    """This thread's decode-table cache for the compiled decoder (imports Numba on first use).

    Returns:
        a ``TableCache``, one per thread: ``keys`` uint8 ``[S, 128]``, ``ent`` uint64
        ``[S, 4096]``, ``len1`` uint8 ``[S, 4096]``, ``state`` int64 ``[S + 1]`` (the arrays
        :func:`decode_into` takes), and ``decode(src, n, out) -> status``.

    Raises:
        AttributeError: Numba is not installed (no compiled decoder).
    """
    c = getattr(_tls, "cache", None)
    if c is None:
        c = _tls.cache = _jit().TableCache()
    return c


def __getattr__(name):
    """``decode_into``: the compiled chunk decoder, for callers that run it inside their own
    Numba kernels (``zipmoe_rt.kernels.planes`` decodes and merges without the GIL); resolved on
    first access, so importing this module does not import Numba.

    ``decode_into(src, n, out, keys, ent, len1, state) -> int``: decode the chunk ``src``
    (uint8) into ``out[:n]`` (uint8) with a :func:`table_cache`'s arrays; returns 0 or a
    :data:`DECODE_STATUS` code, never reading or writing outside the arrays.

    Raises:
        AttributeError: another name, or ``decode_into`` without Numba.
    """
    if name == "decode_into":
        jit = _jit()
        if jit is not None:
            return jit.decode_into
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HuffmanError(ValueError):
    """A Huffman chunk that is malformed (bad code lengths, stream sizes or bit counts)."""


# -- code construction ----------------------------------------------------------------------
def code_lengths(hist, max_bits: int = MAX_BITS) -> np.ndarray:
    """Length-limited Huffman code lengths by package-merge (Larmore & Hirschberg 1990).

    Args:
        hist: int [256] symbol counts.
        max_bits: longest allowed code (≤ 12 for this format).

    Returns:
        uint8 [256] lengths; 0 for absent symbols. The code is always complete (Kraft sum 1):
        a lone symbol gets length 1 and so does a dummy partner (``s ^ 1``); no symbols at all
        give all zeros.
    """
    hist = np.asarray(hist, dtype=np.int64)
    syms = [int(s) for s in np.flatnonzero(hist)]
    out = np.zeros(256, np.uint8)
    if not syms:
        return out
    if len(syms) == 1:
        out[syms[0]] = out[syms[0] ^ 1] = 1
        return out
    leaves = sorted((int(hist[s]), (s,)) for s in syms)
    items = list(leaves)
    for _ in range(max_bits - 1):
        merged = [(items[i][0] + items[i + 1][0], items[i][1] + items[i + 1][1])
                  for i in range(0, len(items) - 1, 2)]
        items = sorted(leaves + merged)
    for _, members in items[: 2 * len(syms) - 2]:
        for s in members:
            out[s] += 1
    return out


def canonical_codes(lengths) -> np.ndarray:
    """Canonical codes, bit-reversed for LSB-first packing (SPEC §5.3).

    Codes are assigned in order of (length, symbol), as in DEFLATE (RFC 1951 §3.2.2).

    Args:
        lengths: uint8 [256] code lengths (0 = absent).

    Returns:
        uint32 [256]: the code of symbol ``s`` with its first bit in bit 0.

    Raises:
        HuffmanError: a length above :data:`MAX_BITS`, or lengths that do not form a complete
            prefix code (Kraft sum other than 1) while some symbol is present.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != (256,):
        raise HuffmanError(f"expected 256 code lengths, got {lengths.shape}")
    if lengths.max(initial=0) > MAX_BITS:
        raise HuffmanError(f"code length {int(lengths.max())} above {MAX_BITS}")
    present = lengths > 0
    if present.any():
        kraft = int(np.sum(1 << (MAX_BITS - lengths[present])))
        if kraft != 1 << MAX_BITS:
            raise HuffmanError(f"code lengths do not form a complete prefix code "
                               f"(Kraft sum {kraft} / {1 << MAX_BITS})")
    codes = np.zeros(256, np.uint32)
    code, prev = 0, 0
    for ln, s in sorted((int(lengths[s]), s) for s in range(256) if lengths[s]):
        code <<= ln - prev
        prev = ln
        codes[s] = int(format(code, f"0{ln}b")[::-1], 2)
        code += 1
    return codes


def pack_lengths(lengths) -> bytes:
    """The 128-byte nibble-packed form of 256 code lengths."""
    ln = np.asarray(lengths, dtype=np.uint8)
    return (ln[0::2] | (ln[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_lengths(b) -> np.ndarray:
    """uint8 [256] code lengths from the first 128 bytes of a chunk."""
    v = np.frombuffer(b, np.uint8, LENGTHS_BYTES)
    out = np.empty(256, np.uint8)
    out[0::2] = v & 15
    out[1::2] = v >> 4
    return out


def stream_ranges(n: int) -> list[tuple[int, int]]:
    """[(begin, end)] of the exponents each of the 4 streams codes (SPEC §5.3)."""
    q = -(-n // STREAMS)
    return [(min(n, s * q), min(n, (s + 1) * q)) for s in range(STREAMS)]


# -- encoding -------------------------------------------------------------------------------
#: exponents counted per step by :func:`histogram` (``np.bincount`` widens its input to int64:
#: over a whole plane that was 8 bytes of temporary memory per exponent)
HIST_BLOCK = 1 << 18


def histogram(x: np.ndarray) -> np.ndarray:
    """int64 [256] counts of each byte value of uint8 [n] ``x``, counted
    :data:`HIST_BLOCK` bytes at a time (temporary memory: 8 x HIST_BLOCK bytes, whatever n)."""
    x = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    if x.size <= HIST_BLOCK:
        return np.bincount(x, minlength=256)
    hist = np.zeros(256, np.int64)
    for a in range(0, x.size, HIST_BLOCK):
        hist += np.bincount(x[a:a + HIST_BLOCK], minlength=256)
    return hist


def _pack_numpy(x: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """LSB-first bit packing of one stream, vectorised: codes never overlap, so bytes are sums."""
    if x.size == 0:
        return b""
    ln = lengths[x].astype(np.int64)
    pos = np.cumsum(ln) - ln
    nbytes = int((pos[-1] + ln[-1] + 7) >> 3)
    v = codes[x].astype(np.int64) << (pos & 7)
    byte = pos >> 3
    acc = np.zeros(nbytes + 3, np.int64)
    for k in range(3):   # a code of <= 12 bits shifted by <= 7 spans at most 3 bytes
        acc += np.bincount(byte + k, weights=(v >> (8 * k)) & 255, minlength=nbytes + 3).astype(np.int64)
    return acc[:nbytes].astype(np.uint8).tobytes()


def encode(exp, lengths=None, use_jit: bool | None = None) -> bytes:
    """Huffman-code one exponent chunk.

    Args:
        exp: uint8 [n] exponents (any 1-byte-per-element array or bytes-like).
        lengths: uint8 [256] code lengths to use (e.g. :func:`code_lengths` of the whole tensor,
            so that all its chunks share one code and decoders build its table once); must give
            every symbol of ``exp`` a code. Default: the chunk's own optimal code.
        use_jit: force (True) or forbid (False) the Numba encoder; default: use it if importable.

    Returns:
        The chunk bytes (header + 4 streams), ``HEADER_BYTES`` + ~n * 2.6 / 8 bytes on real
        weights. Decode needs ``n`` (recorded as the chunk's ``raw_size`` in the index).

    Raises:
        ValueError: ``lengths`` gives no code to a symbol present in ``exp``.
        HuffmanError: ``lengths`` is not a complete prefix code of <= 12 bits.
    """
    x = np.frombuffer(memoryview(exp).cast("B"), np.uint8) if not isinstance(exp, np.ndarray) \
        else np.ascontiguousarray(exp).reshape(-1).view(np.uint8)
    hist = histogram(x)
    if lengths is None:
        lengths = code_lengths(hist)
    lengths = np.asarray(lengths, dtype=np.uint8)
    if np.any((hist > 0) & (lengths == 0)):
        raise ValueError("code lengths give no code to some exponent of the chunk")
    codes = canonical_codes(lengths)
    jit = _jit() is not None if use_jit is None else use_jit
    streams = []
    for a, b in stream_ranges(x.size):
        if jit:
            streams.append(_jit().pack(x[a:b], codes, lengths))
        else:
            streams.append(_pack_numpy(x[a:b], codes, lengths))
    head = pack_lengths(lengths) + struct.pack(f"<{STREAMS}I", *(len(s) for s in streams))
    return head + b"".join(streams)


# -- decoding -------------------------------------------------------------------------------
def parse_header(chunk, n: int):
    """Validate a chunk's header against ``n`` exponents.

    Returns:
        (lengths uint8 [256], [(stream byte offset, size)] x 4).

    Raises:
        HuffmanError: too short, stream sizes that do not add up to the chunk, bad lengths, or
            streams with symbols but no code.
    """
    mv = memoryview(chunk).cast("B")
    if len(mv) < HEADER_BYTES:
        raise HuffmanError(f"Huffman chunk of {len(mv)} bytes is shorter than its "
                           f"{HEADER_BYTES}-byte header")
    lengths = unpack_lengths(mv[:LENGTHS_BYTES])
    sizes = struct.unpack_from(f"<{STREAMS}I", mv, LENGTHS_BYTES)
    if HEADER_BYTES + sum(sizes) != len(mv):
        raise HuffmanError(f"stream sizes {list(sizes)} do not add up to the chunk's "
                           f"{len(mv) - HEADER_BYTES} payload bytes")
    canonical_codes(lengths)   # validates
    if n > 0 and not lengths.any():
        raise HuffmanError(f"chunk of {n} exponents has an empty code")
    spans, off = [], HEADER_BYTES
    for s in sizes:
        spans.append((off, s))
        off += s
    return lengths, spans


def decode_table(lengths) -> tuple[np.ndarray, np.ndarray]:
    """Multi-symbol decode table indexed by the next 12 bits of a stream.

    Returns:
        ``(ent, len1)``, 4096 entries each. ``ent`` uint64: the whole codes the 12 bits hold (up
        to 6, greedily from bit 0) as symbol bytes in bits 0-47 (the first in the low byte),
        their count in bits 48-51 and the bits they use in bits 52-55. ``len1`` uint8: bits of
        the first code alone.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    size = 1 << MAX_BITS
    one = np.zeros(size, np.int64)
    onelen = np.zeros(size, np.int64)
    for s in range(256):
        ln = int(lengths[s])
        if ln:
            one[int(codes[s])::1 << ln] = s
            onelen[int(codes[s])::1 << ln] = ln
    ent = np.zeros(size, np.uint64)
    for idx in range(size):
        used = k = v = 0
        while k < MAX_SYMS_PER_ENTRY:
            sub = idx >> used
            ln = int(onelen[sub])
            if ln == 0 or used + ln > MAX_BITS:
                break
            v |= int(one[sub]) << (8 * k)
            k += 1
            used += ln
        ent[idx] = v | (k << 48) | (used << 52)
    return ent, onelen.astype(np.uint8)


def _decode_stream_py(data: bytes, count: int, ent, len1) -> tuple[bytes, int]:
    """Reference decoder of one stream: (symbols, bits consumed)."""
    out = bytearray()
    mask = (1 << MAX_BITS) - 1
    pos = 0
    nbits = 8 * len(data)
    buf = int.from_bytes(data[:8], "little")
    base = 0   # bit position of buf's bit 0
    while len(out) < count:
        if pos - base > 32:   # slide the window
            byte = pos >> 3
            base = byte * 8
            buf = int.from_bytes(data[byte:byte + 8], "little")
        idx = (buf >> (pos - base)) & mask
        v = int(ent[idx])
        k, used = (v >> 48) & 15, v >> 52
        if len(out) + k <= count:
            out += v.to_bytes(8, "little")[:k]
            pos += used
        else:
            out.append(v & 255)
            pos += int(len1[idx])
        if pos > nbits:
            break
    return bytes(out), pos


def decode(chunk, n: int, out: np.ndarray | None = None, use_jit: bool | None = None) -> np.ndarray:
    """Decode a chunk from :func:`encode` back into ``n`` exponents.

    Args:
        chunk: the chunk bytes (bytes-like or uint8 array).
        n: number of exponents it codes (the index's ``raw_size``).
        out: optional uint8 [n] destination.
        use_jit: force (True) or forbid (False) the Numba decoder; default: use it if importable.

    Returns:
        uint8 [n] exponents (``out`` if given).

    Raises:
        HuffmanError: a malformed chunk: bad header, or a stream whose bits do not decode to
            exactly its share of ``n`` symbols within exactly its bytes.
    """
    if out is None:
        out = np.empty(n, np.uint8)
    elif out.dtype != np.uint8 or out.size != n:
        raise ValueError(f"out must be uint8 [{n}], got {out.dtype} {out.shape}")
    src = chunk if isinstance(chunk, np.ndarray) else np.frombuffer(memoryview(chunk).cast("B"), np.uint8)
    if _jit() is not None if use_jit is None else use_jit:
        status = table_cache().decode(src.reshape(-1).view(np.uint8), n, out)
        if status:
            raise HuffmanError(f"malformed Huffman chunk: {DECODE_STATUS[status]}")
        return out
    lengths, spans = parse_header(src, n)
    if n == 0:
        if any(s for _, s in spans):
            raise HuffmanError("chunk of 0 exponents has non-empty streams")
        return out
    ent, len1 = decode_table(lengths)
    for (a, b), (off, size) in zip(stream_ranges(n), spans):
        got, used = _decode_stream_py(bytes(src[off:off + size]), b - a, ent, len1)
        if len(got) != b - a or (used + 7) // 8 != size:
            raise HuffmanError(f"malformed Huffman chunk: a stream of {size} bytes does not "
                               f"decode to exactly {b - a} exponents")
        out[a:b] = np.frombuffer(got, np.uint8)
    return out
