"""Numba kernels of the Huffman exponent codec (format/SPEC.md §5.3): an optional accelerator
of :mod:`zmoe.huffman`, imported only when Numba is installed.

The decoder keeps one 64-bit bit buffer per stream, refills it branch-free with an unaligned
8-byte load (≥ 56 valid bits, room for four 12-bit lookups), and for each lookup loads one
uint64 table entry (up to 6 symbols, their count and bit length; the table is 32 KB, an L1
cache) and stores it with one unaligned 8-byte store, advancing by the entry's count.
The four streams are decoded in one loop so their independent dependency chains overlap. Every
load and store stays inside its buffers: the fast loop runs only while a stream has ≥ 8 input
bytes and ≥ 32 output slots left; the rest is decoded by a bounds-checked loop. All kernels are
``nogil``, so decode workers run them on several cores at once.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .huffman import DECODE_STATUS

MAX_BITS = 12
TABLE = 1 << MAX_BITS
MASK = TABLE - 1
#: Most codes one table entry holds: 6 symbol bytes, then the count (bits 48-51) and the bits
#: they use (bits 52-55) in one uint64, so one load serves a lookup and one store writes it.
MAX_SYMS = 6
HEADER_BYTES = 128 + 16

#: decode status -> message (defined with the reference codec, which reports the same failures)
STATUS = DECODE_STATUS


@intrinsic
def load_u64(typingctx, arr, idx):
    """Unaligned little-endian uint64 load from a uint8 array at byte ``idx`` (no bounds check)."""
    sig = types.uint64(arr, idx)

    def codegen(context, builder, signature, args):
        a, i = args
        ary = context.make_array(signature.args[0])(context, builder, a)
        ptr = builder.bitcast(builder.gep(ary.data, [i]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)
    return sig, codegen


@intrinsic
def store_u64(typingctx, arr, idx, val):
    """Unaligned little-endian uint64 store into a uint8 array at byte ``idx`` (no bounds check)."""
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):
        a, i, v = args
        ary = context.make_array(signature.args[0])(context, builder, a)
        ptr = builder.bitcast(builder.gep(ary.data, [i]), ir.IntType(64).as_pointer())
        builder.store(v, ptr, align=1)
        return context.get_dummy_value()
    return sig, codegen


_OPT = dict(nogil=True, cache=True, boundscheck=False)


@nb.njit(**_OPT)
def pack_stream(x, codes, lengths, out):
    """LSB-first bit packing of symbols ``x`` (uint8 [m]) with ``codes`` (uint32 [256], bit-
    reversed) and ``lengths`` (uint8 [256]) into ``out`` (uint8, ≥ ceil(12 m / 8) + 8 bytes).
    Returns the number of bytes written."""
    acc = np.uint64(0)
    nbits = 0
    o = 0
    for i in range(x.shape[0]):
        s = x[i]
        acc |= np.uint64(codes[s]) << np.uint64(nbits)
        nbits += lengths[s]
        if nbits >= 32:
            store_u64(out, o, acc)
            o += 4
            acc >>= np.uint64(32)
            nbits -= 32
    while nbits > 0:
        out[o] = np.uint8(acc & np.uint64(255))
        o += 1
        acc >>= np.uint64(8)
        nbits -= 8
    return o


def pack(x: np.ndarray, codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """One stream's bytes (see :func:`pack_stream`)."""
    out = np.empty(x.size * MAX_BITS // 8 + 16, np.uint8)
    n = pack_stream(np.ascontiguousarray(x), codes.astype(np.uint32), lengths.astype(np.uint8), out)
    return out[:n].tobytes()


@nb.njit(**_OPT)
def build_tables(lengths, ent, len1):
    """Fill the multi-symbol decode table ``ent`` (uint64 [4096], see
    :func:`zmoe.huffman.decode_table`) and ``len1`` (uint8 [4096], bits of the first code) from
    uint8 [256] ``lengths``. Returns False if they are not a complete prefix code of ≤ 12 bits."""
    count = np.zeros(MAX_BITS + 2, np.int64)
    kraft = 0
    minlen = MAX_BITS
    for s in range(256):
        ln = lengths[s]
        if ln > MAX_BITS:
            return False
        if ln:
            minlen = min(minlen, np.int64(ln))
            count[ln] += 1
            kraft += 1 << (MAX_BITS - ln)
    if kraft != TABLE:
        return False
    nxt = np.zeros(MAX_BITS + 2, np.int64)
    code = 0
    for b in range(1, MAX_BITS + 1):
        code = (code + count[b - 1]) << 1
        nxt[b] = code
    one = np.empty(TABLE, np.uint8)
    for s in range(256):
        ln = np.int64(lengths[s])
        if ln == 0:
            continue
        c = nxt[ln]
        nxt[ln] += 1
        r = 0
        for i in range(ln):
            r = (r << 1) | ((c >> i) & 1)
        for idx in range(r, TABLE, 1 << ln):
            one[idx] = s
            len1[idx] = ln
    if minlen >= 2:
        _fill_by_levels(one, len1, ent)
        return True
    for idx in range(TABLE):   # 1-bit codes: 12 bits may hold more than 6 codes; cap greedily
        used = 0
        k = 0
        v = np.uint64(0)
        while k < MAX_SYMS:
            sub = idx >> used
            ln = np.int64(len1[sub])
            if used + ln > MAX_BITS:
                break
            v |= np.uint64(one[sub]) << np.uint64(8 * k)
            k += 1
            used += ln
        ent[idx] = v | (np.uint64(k) << np.uint64(48)) | (np.uint64(used) << np.uint64(52))
    return True


@nb.njit(**_OPT)
def _fill_by_levels(one, len1, ent):
    """Multi-symbol entries built bottom-up: the decode of ``b`` bits ``r`` is the first code
    of ``r`` followed by the decode of the ``b - len`` bits after it (levels 0..12, 8191
    entries, no searching). Valid when every code has ≥ 2 bits (≤ 6 codes per entry)."""
    vs = np.empty(2 * TABLE, np.uint64)
    ks = np.empty(2 * TABLE, np.int64)
    us = np.empty(2 * TABLE, np.int64)
    vs[1] = 0
    ks[1] = 0
    us[1] = 0
    for b in range(1, MAX_BITS + 1):
        base = 1 << b
        for r in range(base):
            ln = np.int64(len1[r])
            if ln > b:
                vs[base + r] = 0
                ks[base + r] = 0
                us[base + r] = 0
            else:
                j = (1 << (b - ln)) + (r >> ln)
                vs[base + r] = np.uint64(one[r]) | (vs[j] << np.uint64(8))
                ks[base + r] = ks[j] + 1
                us[base + r] = us[j] + ln
    for idx in range(TABLE):
        ent[idx] = vs[TABLE + idx] | (np.uint64(ks[TABLE + idx]) << np.uint64(48)) \
            | (np.uint64(us[TABLE + idx]) << np.uint64(52))


@nb.njit(**_OPT)
def _tail(src, start, size, bitpos, o, e, out, ent, len1):
    """Bounds-checked decode of symbols ``out[o:e]`` from the stream at ``src[start:start+size]``
    from bit ``bitpos``. Returns the final bit position, or -1 past the stream's end."""
    nbits = size * 8
    while o < e:
        byte = bitpos >> 3
        w = np.uint64(0)
        for k in range(3):
            if byte + k < size:
                w |= np.uint64(src[start + byte + k]) << np.uint64(8 * k)
        idx = (w >> np.uint64(bitpos & 7)) & np.uint64(MASK)
        v = ent[idx]
        k = np.int64((v >> np.uint64(48)) & np.uint64(15))
        if o + k <= e:
            for j in range(k):
                out[o + j] = np.uint8((v >> np.uint64(8 * j)) & np.uint64(255))
            o += k
            bitpos += np.int64(v >> np.uint64(52))
        else:
            out[o] = np.uint8(v & np.uint64(255))
            o += 1
            bitpos += np.int64(len1[idx])
        if bitpos > nbits:
            return -1
    return bitpos


@nb.njit(**_OPT)
def _fast1(src, p, end, b, c, o, e, out, ent):
    """Single-stream fast loop; returns (p, b, c, o) where it stopped (≥ 8 bytes or < 32 slots
    left would be needed)."""
    mask = np.uint64(MASK)
    while o + 32 <= e and p + 8 <= end:
        b |= load_u64(src, p) << np.uint64(c)
        p += (63 - c) >> 3
        c |= 56
        for _ in range(4):
            v = ent[b & mask]
            store_u64(out, o, v)
            o += np.int64((v >> np.uint64(48)) & np.uint64(15))
            s = np.int64(v >> np.uint64(52))
            b >>= np.uint64(s)
            c -= s
    return p, b, c, o


#: decode tables kept per thread (chunks of one tensor share their code, SPEC §5.3)
CACHE_SLOTS = 4


class TableCache:
    """Per-thread cache of decode tables keyed by a chunk's 128 code-length bytes.

    Attributes are the arrays :func:`decode_into` takes: ``keys`` uint8 [S, 128], ``ent``
    uint64 [S, 4096], ``len1`` uint8 [S, 4096], ``state`` int64 [S + 1] (valid flags, then the
    next slot to replace). ~37 KB per slot.
    """

    def __init__(self, slots: int = CACHE_SLOTS):
        self.keys = np.zeros((slots, 128), np.uint8)
        self.ent = np.zeros((slots, TABLE), np.uint64)
        self.len1 = np.zeros((slots, TABLE), np.uint8)
        self.state = np.zeros(slots + 1, np.int64)

    def decode(self, src: np.ndarray, n: int, out: np.ndarray) -> int:
        """Decode chunk ``src`` (uint8) into ``out[:n]`` (uint8); returns a :data:`STATUS`
        code, 0 on success."""
        return decode_into(src, n, out, self.keys, self.ent, self.len1, self.state)


@nb.njit(**_OPT)
def _lookup_tables(src, keys, ent, len1, state):
    """Slot of the tables for the code lengths in ``src[:128]``, building them on a miss;
    -1 if the lengths are invalid."""
    slots = keys.shape[0]
    for t in range(slots):
        if state[t]:
            same = True
            for i in range(128):
                if keys[t, i] != src[i]:
                    same = False
                    break
            if same:
                return t
    t = state[slots] % slots
    state[slots] += 1
    state[t] = 0
    lengths = np.empty(256, np.uint8)
    for i in range(128):
        lengths[2 * i] = src[i] & 15
        lengths[2 * i + 1] = src[i] >> 4
        keys[t, i] = src[i]
    if not build_tables(lengths, ent[t], len1[t]):
        return -1
    state[t] = 1
    return t


@nb.njit(**_OPT)
def _lengths_ok(src):
    """Whether the code lengths in ``src[:128]`` are all ≤ 12 and either all 0 or a complete
    prefix code (what :func:`zmoe.huffman.parse_header` accepts)."""
    kraft = 0
    for i in range(128):
        lo = np.int64(src[i] & 15)
        hi = np.int64(src[i] >> 4)
        if lo > MAX_BITS or hi > MAX_BITS:
            return False
        if lo:
            kraft += 1 << (MAX_BITS - lo)
        if hi:
            kraft += 1 << (MAX_BITS - hi)
    return kraft == 0 or kraft == TABLE


@nb.njit(**_OPT)
def decode_into(src, n, out, keys, ent_c, len1_c, state):
    """Decode one Huffman chunk (uint8 ``src``, header included) into ``out[:n]`` (uint8),
    with decode tables from the cache arrays of a :class:`TableCache`.

    Preconditions (unchecked; the only ones): ``n >= 0`` and ``out.shape[0] >= n``
    (:func:`zmoe.huffman.decode` requires ``out.size == n``; the index's ``raw_size`` is the
    ``n`` and :mod:`zmoe.validate` bounds it by the tensor's shape). ``src`` is untrusted: its
    code lengths, stream sizes and bit counts are all checked.

    Returns 0 on success, else a :data:`STATUS` code; never reads or writes outside the arrays.
    """
    if src.shape[0] < HEADER_BYTES:
        return 4
    starts = np.empty(4, np.int64)
    ends = np.empty(4, np.int64)
    pos = HEADER_BYTES
    for s in range(4):
        sz = np.int64(src[128 + 4 * s]) | (np.int64(src[129 + 4 * s]) << 8) \
            | (np.int64(src[130 + 4 * s]) << 16) | (np.int64(src[131 + 4 * s]) << 24)
        starts[s] = pos
        pos += sz
        ends[s] = pos
    if pos != src.shape[0]:
        return 2
    if n == 0:
        if pos != HEADER_BYTES:
            return 3
        return 0 if _lengths_ok(src) else 1
    t = _lookup_tables(src, keys, ent_c, len1_c, state)
    if t < 0:
        return 1
    ent = ent_c[t]
    len1 = len1_c[t]
    q = (n + 3) // 4
    o0, o1, o2, o3 = 0, min(n, q), min(n, 2 * q), min(n, 3 * q)
    e0, e1, e2, e3 = o1, o2, o3, n
    p0, p1, p2, p3 = starts[0], starts[1], starts[2], starts[3]
    E0, E1, E2, E3 = ends[0], ends[1], ends[2], ends[3]
    b0 = b1 = b2 = b3 = np.uint64(0)
    c0 = c1 = c2 = c3 = 0
    mask = np.uint64(MASK)
    while (o0 + 32 <= e0 and o1 + 32 <= e1 and o2 + 32 <= e2 and o3 + 32 <= e3
           and p0 + 8 <= E0 and p1 + 8 <= E1 and p2 + 8 <= E2 and p3 + 8 <= E3):
        b0 |= load_u64(src, p0) << np.uint64(c0)
        p0 += (63 - c0) >> 3
        c0 |= 56
        b1 |= load_u64(src, p1) << np.uint64(c1)
        p1 += (63 - c1) >> 3
        c1 |= 56
        b2 |= load_u64(src, p2) << np.uint64(c2)
        p2 += (63 - c2) >> 3
        c2 |= 56
        b3 |= load_u64(src, p3) << np.uint64(c3)
        p3 += (63 - c3) >> 3
        c3 |= 56
        for _ in range(4):
            v0 = ent[b0 & mask]
            v1 = ent[b1 & mask]
            v2 = ent[b2 & mask]
            v3 = ent[b3 & mask]
            store_u64(out, o0, v0)
            store_u64(out, o1, v1)
            store_u64(out, o2, v2)
            store_u64(out, o3, v3)
            o0 += np.int64((v0 >> np.uint64(48)) & np.uint64(15))
            o1 += np.int64((v1 >> np.uint64(48)) & np.uint64(15))
            o2 += np.int64((v2 >> np.uint64(48)) & np.uint64(15))
            o3 += np.int64((v3 >> np.uint64(48)) & np.uint64(15))
            s0 = np.int64(v0 >> np.uint64(52))
            s1 = np.int64(v1 >> np.uint64(52))
            s2 = np.int64(v2 >> np.uint64(52))
            s3 = np.int64(v3 >> np.uint64(52))
            b0 >>= np.uint64(s0)
            b1 >>= np.uint64(s1)
            b2 >>= np.uint64(s2)
            b3 >>= np.uint64(s3)
            c0 -= s0
            c1 -= s1
            c2 -= s2
            c3 -= s3
    state = ((p0, b0, c0, o0, e0), (p1, b1, c1, o1, e1), (p2, b2, c2, o2, e2), (p3, b3, c3, o3, e3))
    for s in range(4):
        p, b, c, o, e = state[s]
        p, b, c, o = _fast1(src, p, ends[s], b, c, o, e, out, ent)
        bitpos = (p - starts[s]) * 8 - c
        size = ends[s] - starts[s]
        bitpos = _tail(src, starts[s], size, bitpos, o, e, out, ent, len1)
        if bitpos < 0 or (bitpos + 7) >> 3 != size:
            return 3
    return 0
