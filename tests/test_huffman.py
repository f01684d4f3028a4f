"""Huffman exponent chunks (format/SPEC.md §5.2, §5.3), checked against the SPEC.

The oracles here (``spec_*``) are written from the SPEC text alone: nibble-packed lengths,
DEFLATE canonical codes (RFC 1951 §3.2.2), 4 streams over ``[min(n, i q), min(n, (i+1) q))``,
codes written most-significant bit first into LSB-first bytes, bit-by-bit decoding. The
implementation (``zmoe.huffman`` and its Numba kernels ``zmoe._huffjit``) is compared with them
on both of its paths (``use_jit=False`` / ``True``).
"""
from __future__ import annotations

import heapq
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from itertools import product

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zmoe
from zmoe_edit import mutate, rewrite_index
from zmoe import (CorruptIndexError, ExpertPiece, UnsupportedCodecError, ZmoeReader, ZmoeWriter,
                  encode_expert)
from zmoe import _huffjit
from zmoe import huffman as H
from zmoe.huffman import HuffmanError

PATHS = pytest.mark.parametrize("jit", [False, True], ids=["ref", "jit"])
HEAD = 128 + 16


# ---------------------------------------------------------------------------------------------
# SPEC §5.3 oracles
# ---------------------------------------------------------------------------------------------
def spec_unpack_lengths(b) -> list[int]:
    """Symbol s's length: low nibble of byte s // 2 if s is even, the high nibble if odd."""
    return [(b[s // 2] >> (4 * (s & 1))) & 15 for s in range(256)]


def spec_pack_lengths(lengths) -> bytes:
    return bytes(int(lengths[2 * i]) | int(lengths[2 * i + 1]) << 4 for i in range(128))


def spec_canonical(lengths) -> dict:
    """{symbol: (code, length)}, code MSB-first, by RFC 1951 §3.2.2 (bl_count / next_code)."""
    bl_count = [0] * 16
    for ln in lengths:
        if ln:
            bl_count[ln] += 1
    next_code, code = [0] * 16, 0
    for bits in range(1, 16):
        code = (code + bl_count[bits - 1]) << 1
        next_code[bits] = code
    out = {}
    for s in range(256):
        ln = int(lengths[s])
        if ln:
            out[s] = (next_code[ln], ln)
            next_code[ln] += 1
    return out


def spec_ranges(n):
    q = -(-n // 4)
    return [(min(n, i * q), min(n, (i + 1) * q)) for i in range(4)]


def spec_encode(x, lengths) -> bytes:
    """The chunk the SPEC prescribes for exponents ``x`` under code ``lengths``."""
    codes = spec_canonical(lengths)
    x = [int(v) for v in x]
    streams = []
    for a, b in spec_ranges(len(x)):
        bits = []
        for s in x[a:b]:
            c, ln = codes[s]
            bits += [(c >> (ln - 1 - j)) & 1 for j in range(ln)]   # first (MSB) bit first
        buf = bytearray((len(bits) + 7) // 8)
        for j, bit in enumerate(bits):                            # bit j -> byte j//8, bit j%8
            buf[j // 8] |= bit << (j % 8)
        streams.append(bytes(buf))
    return spec_pack_lengths(lengths) + struct.pack("<4I", *map(len, streams)) + b"".join(streams)


def spec_decode(chunk, n):
    """Bit-by-bit decode per SPEC §5.3.

    Returns None where the SPEC makes the chunk invalid for ``n``, else ``(exponents, loose)``
    where ``loose`` means a stricter decoder may also refuse it (non-zero padding bits, or a
    chunk of 0 exponents whose lengths are a complete code rather than all 0).
    """
    chunk = bytes(chunk)
    if len(chunk) < HEAD:
        return None
    lengths = spec_unpack_lengths(chunk[:128])
    sizes = struct.unpack_from("<4I", chunk, 128)
    if HEAD + sum(sizes) != len(chunk) or max(lengths) > 12:
        return None
    present = [ln for ln in lengths if ln]
    if present and sum(1 << (12 - ln) for ln in present) != 1 << 12:
        return None
    if not present and n > 0:
        return None
    table = {(ln, c): s for s, (c, ln) in spec_canonical(lengths).items()}
    out, loose, off = bytearray(), bool(present) and n == 0, HEAD
    for (a, b), size in zip(spec_ranges(n), sizes):
        data = chunk[off:off + size]
        off += size
        pos, nbits = 0, 8 * size
        for _ in range(b - a):
            c = ln = 0
            while (ln, c) not in table:
                if pos >= nbits:
                    return None
                c = c << 1 | (data[pos >> 3] >> (pos & 7)) & 1
                ln += 1
                pos += 1
            out.append(table[(ln, c)])
        if (pos + 7) // 8 != size:
            return None
        if pos % 8 and data[-1] >> (pos % 8):
            loose = True
    return bytes(out), loose


def huffman_cost(hist) -> int:
    """Total bits of an unconstrained Huffman code (sum of merged weights); 0 for < 2 symbols."""
    h = [int(c) for c in hist if c]
    heapq.heapify(h)
    cost = 0
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h)
        cost += a + b
        heapq.heappush(h, a + b)
    return cost


def huffman_depth(hist) -> int:
    """Longest code of an unconstrained Huffman code (ties broken arbitrarily)."""
    h = [(int(c), 0, i) for i, c in enumerate(hist) if c]
    heapq.heapify(h)
    k = len(h)
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h)
        heapq.heappush(h, (a[0] + b[0], max(a[1], b[1]) + 1, k))
        k += 1
    return h[0][1] if h else 0


def bf16_exponents(n, seed=0, scale=0.02):
    w = (np.random.default_rng(seed).normal(0, scale, n).astype(np.float32).view(np.uint32) >> 16)
    return ((w >> 7) & 0xFF).astype(np.uint8)


def skewed(n, seed=0, p=0.9):
    """One symbol (0x7E) with probability p, the rest spread over a few neighbours."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0x70, 0x80, n).astype(np.uint8)
    x[rng.random(n) < p] = 0x7E
    return x


def geometric():
    """Counts 2^k for k = 0..30 over 31 symbols: unconstrained Huffman depth 30 > 12."""
    hist = np.zeros(256, np.int64)
    syms = np.arange(31) * 7 + 3
    hist[syms] = 2 ** np.arange(31)
    return hist


def dec(chunk, n, jit):
    return H.decode(chunk, n, use_jit=jit)


def check_chunk(x, c):
    """Every SPEC statement about an encoded chunk of exponents ``x``."""
    x = np.asarray(x, np.uint8)
    n = x.size
    lengths = spec_unpack_lengths(c[:128])
    assert max(lengths) <= 12
    present = [ln for ln in lengths if ln]
    if n == 0:
        assert c == bytes(HEAD)      # all lengths 0 and empty streams
        return
    assert sum(1 << (12 - ln) for ln in present) == 1 << 12     # complete prefix code
    assert all(lengths[s] for s in np.unique(x))
    sizes = struct.unpack_from("<4I", c, 128)
    assert HEAD + sum(sizes) == len(c)
    # each stream is exactly ceil(bits / 8) bytes of its own exponents' codes
    for (a, b), size in zip(spec_ranges(n), sizes):
        assert size == (sum(lengths[s] for s in x[a:b].tolist()) + 7) // 8
    if n <= 5000:
        assert c == spec_encode(x, lengths)
        got = spec_decode(c, n)
        assert got is not None and got[0] == x.tobytes() and not got[1]


# ---------------------------------------------------------------------------------------------
# hand-made chunks
# ---------------------------------------------------------------------------------------------
def test_hand_made_chunk_three_symbols():
    """Lengths 1, 2, 2 for symbols 5, 9, 200: canonical codes 0, 10, 11."""
    A, B, C = 5, 9, 200
    lengths = np.zeros(256, np.uint8)
    lengths[[A, B, C]] = [1, 2, 2]
    x = np.array([A, B, C, A, C], np.uint8)    # n = 5, q = 2: streams [0,2) [2,4) [4,5) [5,5)
    head = bytearray(128)
    head[A // 2] = 1 << 4        # 5 is odd: high nibble of byte 2
    head[B // 2] = 2 << 4        # 9 is odd: high nibble of byte 4
    head[C // 2] = 2             # 200 is even: low nibble of byte 100
    streams = [
        bytes([0b010]),          # A=0 then B=1,0: bits 0,1,0 -> 0x02
        bytes([0b011]),          # C=1,1 then A=0 -> 0x03
        bytes([0b11]),           # C=1,1 -> 0x03
        b"",                     # no exponent
    ]
    chunk = bytes(head) + struct.pack("<4I", 1, 1, 1, 0) + b"".join(streams)
    assert chunk[2] == 0x10 and chunk[4] == 0x20 and chunk[100] == 0x02
    assert chunk[HEAD:] == b"\x02\x03\x03"
    for jit in (False, True):
        assert H.encode(x, lengths=lengths, use_jit=jit) == chunk
        assert dec(chunk, 5, jit).tolist() == x.tolist()
    # the chunk's own optimal code for these counts (A x2, B x1, C x2) may pick A or C for the
    # 1-bit code; for A x3 it is unique
    y = np.array([A, B, A, C, A], np.uint8)
    assert spec_unpack_lengths(H.encode(y)[:128]) == lengths.tolist()


def test_hand_made_chunk_codes_cross_bytes():
    """Lengths 1, 2, 3, 3 (A=0, B=10, C=110, D=111); codes straddle byte boundaries."""
    A, B, C, D = 0x10, 0x11, 0x12, 0x13
    lengths = np.zeros(256, np.uint8)
    lengths[[A, B, C, D]] = [1, 2, 3, 3]
    x = np.array([D, D, D, C,     # stream 0: 111 111 111 110 -> bits 0..10 set, bit 11 clear
                  A, A, A, A,     # stream 1: 0 0 0 0 -> one zero byte
                  B, C, D, B,     # stream 2: 10 110 111 10 -> bits 1 0 1 1 0 1 1 1 | 1 0
                  D, A, B, A], np.uint8)   # stream 3: 111 0 10 0 -> bits 1 1 1 0 1 0 0
    # stream 2: bit j set for j in {0, 2, 3, 5, 6, 7, 8}: byte0 = 0b11101101, byte1 = 0b00000001
    # stream 3: bit j set for j in {0, 1, 2, 4}: 0b00010111
    want = (spec_pack_lengths(lengths) + struct.pack("<4I", 2, 1, 2, 1)
            + bytes([0xFF, 0x07]) + bytes([0x00]) + bytes([0xED, 0x01]) + bytes([0x17]))
    assert want[0x10 // 2] == 0x21 and want[0x12 // 2] == 0x33
    for jit in (False, True):
        assert H.encode(x, lengths=lengths, use_jit=jit) == want
        assert dec(want, 16, jit).tolist() == x.tolist()
    assert spec_encode(x, lengths) == want


@pytest.mark.parametrize("s", [0x00, 0x7E, 0x7F, 0xFF])
def test_single_symbol_chunk(s):
    """SPEC: all one symbol s gives s and s ^ 1 length 1; canonical code 0 goes to the smaller."""
    n = 10                         # q = 3: 3, 3, 3, 1 exponents
    x = np.full(n, s, np.uint8)
    bit = 0 if s < s ^ 1 else 1
    want_streams = [bytes([0b111 * bit]), bytes([0b111 * bit]), bytes([0b111 * bit]), bytes([bit])]
    lengths = [0] * 256
    lengths[s] = lengths[s ^ 1] = 1
    want = spec_pack_lengths(lengths) + struct.pack("<4I", 1, 1, 1, 1) + b"".join(want_streams)
    for jit in (False, True):
        c = H.encode(x, use_jit=jit)
        assert c == want
        assert dec(c, n, jit).tolist() == x.tolist()


def test_empty_chunk():
    for jit in (False, True):
        c = H.encode(np.zeros(0, np.uint8), use_jit=jit)
        assert c == bytes(HEAD)
        assert dec(c, 0, jit).size == 0


@pytest.mark.parametrize("n,sizes", [
    (1, (1, 0, 0, 0)), (2, (1, 1, 0, 0)), (3, (1, 1, 1, 0)), (4, (1, 1, 1, 1)), (5, (2, 2, 1, 0)),
    (7, (2, 2, 2, 1)), (31, (8, 8, 8, 7)), (32, (8, 8, 8, 8)), (33, (9, 9, 9, 6)),
    (4097, (1025, 1025, 1025, 1022)),
])
def test_stream_split_with_8_bit_codes(n, sizes):
    """With 256 equally frequent symbols every code has 8 bits, so a stream's byte size is its
    exponent count: stream i codes [min(n, i q), min(n, (i + 1) q)), q = ceil(n / 4)."""
    x = (np.arange(n) * 37 % 256).astype(np.uint8)
    lengths = np.full(256, 8, np.uint8)
    for jit in (False, True):
        c = H.encode(x, lengths=lengths, use_jit=jit)
        assert struct.unpack_from("<4I", c, 128) == sizes
        assert len(c) == HEAD + n
        assert dec(c, n, jit).tolist() == x.tolist()
    # with 8-bit codes assigned in symbol order, code(s) == s: each stream byte is s bit-reversed
    rev = np.array([int(f"{s:08b}"[::-1], 2) for s in range(256)], np.uint8)
    assert c[HEAD:] == rev[x].tobytes()


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
SIZES = [0, 1, 2, 3, 4, 5, 7, 31, 32, 33, 4097, 200_003]
DISTS = {
    "random5": lambda n: np.random.default_rng(n).integers(0, 5, n).astype(np.uint8),
    "repeated": lambda n: np.full(n, 0x7F, np.uint8),
    "uniform256": lambda n: np.random.default_rng(n).integers(0, 256, n).astype(np.uint8),
    "skewed": lambda n: skewed(n, seed=n),
    "bf16": lambda n: bf16_exponents(n, seed=n),
}


@pytest.mark.parametrize("dist", list(DISTS))
@pytest.mark.parametrize("n", SIZES)
def test_roundtrip_both_paths(dist, n):
    x = DISTS[dist](n)
    c_ref = H.encode(x, use_jit=False)
    c_jit = H.encode(x, use_jit=True)
    assert c_ref == c_jit
    check_chunk(x, c_ref)
    for jit in (False, True):
        got = dec(c_ref, n, jit)
        assert got.dtype == np.uint8 and got.shape == (n,)
        np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 33, 4097, 200_003])
def test_roundtrip_length_limit_binds(n):
    """Counts 2^k (k <= 30) want 30-bit codes; the code is limited to 12 bits, and the 1-bit code
    makes table entries that could hold up to 12 codes."""
    hist = geometric()
    lengths = H.code_lengths(hist)
    assert lengths.max() == 12 and huffman_depth(hist) == 30
    rng = np.random.default_rng(n)
    p = hist / hist.sum()
    x = rng.choice(256, n, p=p).astype(np.uint8)
    x[: min(n, 31)] = (np.arange(31) * 7 + 3)[: min(n, 31)]    # the 12-bit codes occur too
    for given_lengths in (None, lengths):
        c = H.encode(x, lengths=given_lengths, use_jit=False)
        assert c == H.encode(x, lengths=given_lengths, use_jit=True)
        check_chunk(x, c)
        for jit in (False, True):
            np.testing.assert_array_equal(dec(c, n, jit), x)


def test_runs_of_one_bit_codes():
    """Entries of > 8 one-bit codes (runs of the 1-bit symbol), also at every stream end."""
    x = skewed(50_000, seed=3, p=0.97)
    assert np.mean(x == 0x7E) > 0.6
    lengths = spec_unpack_lengths(H.encode(x)[:128])
    assert lengths[0x7E] == 1
    for n in (50_000, 49_999, 40, 36, 33, 9):
        y = x[:n].copy()
        y[-1] = 0x70           # a long code last
        for jit in (False, True):
            c = H.encode(y, use_jit=jit)
            check_chunk(y, c)
            np.testing.assert_array_equal(dec(c, n, False), y)
            np.testing.assert_array_equal(dec(c, n, True), y)


def test_real_bf16_exponents_compress():
    x = bf16_exponents(200_000, seed=7)
    c = H.encode(x)
    np.testing.assert_array_equal(dec(c, x.size, True), x)
    np.testing.assert_array_equal(dec(c, x.size, False), x)
    hist = np.bincount(x, minlength=256)
    p = hist / x.size
    entropy = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    bits = 8 * (len(c) - HEAD) / x.size
    assert entropy <= bits < entropy + 0.1
    assert bits < 3.0                 # ~2.6 bits per exponent on normal weights (SPEC §5.2)
    # the rare exponents want up to 17 bits; the 12-bit limit costs well under 1 %
    lengths = np.array(spec_unpack_lengths(c[:128]))
    assert huffman_depth(hist) > 12
    assert huffman_cost(hist) < int(np.sum(hist * lengths)) < 1.01 * huffman_cost(hist)


def test_decode_accepts_bytes_memoryview_and_array():
    x = bf16_exponents(1000)
    c = H.encode(x)
    for src in (c, memoryview(c), bytearray(c), np.frombuffer(c, np.uint8)):
        for jit in (False, True):
            np.testing.assert_array_equal(dec(src, x.size, jit), x)
    out = np.empty(x.size, np.uint8)
    assert H.decode(c, x.size, out=out) is out
    np.testing.assert_array_equal(out, x)


@st.composite
def exponent_arrays(draw):
    n = draw(st.integers(0, 3000))
    kind = draw(st.sampled_from(["zipf", "bytes", "few"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "bytes":
        return np.frombuffer(draw(st.binary(min_size=n, max_size=n)), np.uint8).copy()
    k = draw(st.integers(1, 256 if kind == "zipf" else 3))
    syms = rng.permutation(256)[:k]
    w = 1.0 / np.arange(1, k + 1) ** draw(st.floats(0, 4))
    return syms[rng.choice(k, n, p=w / w.sum())].astype(np.uint8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=exponent_arrays())
def test_roundtrip_property(x):
    c = H.encode(x, use_jit=False)
    assert H.encode(x, use_jit=True) == c
    check_chunk(x, c)
    for jit in (False, True):
        np.testing.assert_array_equal(dec(c, x.size, jit), x)


# ---------------------------------------------------------------------------------------------
# code construction
# ---------------------------------------------------------------------------------------------
def _check_lengths(hist, lengths, max_bits=12):
    hist = np.asarray(hist)
    lengths = np.asarray(lengths)
    assert lengths.shape == (256,) and lengths.max() <= max_bits
    present = np.flatnonzero(hist)
    if present.size == 0:
        assert not lengths.any()
        return
    if present.size == 1:
        s = int(present[0])
        assert lengths[s] == lengths[s ^ 1] == 1 and np.count_nonzero(lengths) == 2
        return
    assert (lengths[present] > 0).all() and (lengths[hist == 0] == 0).all()
    assert sum(1 << (max_bits - int(v)) for v in lengths[present]) == 1 << max_bits   # Kraft = 1
    # more frequent never longer (holds for every optimal code)
    order = present[np.argsort(-hist[present], kind="stable")]
    for a, b in zip(order, order[1:]):
        if hist[a] > hist[b]:
            assert lengths[a] <= lengths[b]


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 10**9), min_size=256, max_size=256)
       | st.lists(st.integers(0, 50), min_size=256, max_size=256)
       | st.dictionaries(st.integers(0, 255), st.integers(1, 2**40), max_size=40).map(
           lambda d: [d.get(s, 0) for s in range(256)]))
def test_code_lengths_property(counts):
    hist = np.array(counts, np.int64)
    lengths = H.code_lengths(hist)
    _check_lengths(hist, lengths)
    cost = int(np.sum(hist * lengths))
    if np.count_nonzero(hist) >= 2:
        opt = huffman_cost(hist)
        assert cost >= opt
        if huffman_depth(hist) <= 12:     # no limit binds: exactly Huffman's optimum
            assert cost == opt


def test_code_lengths_limit_binds():
    hist = geometric()
    lengths = H.code_lengths(hist)
    _check_lengths(hist, lengths)
    assert lengths.max() == 12
    assert int(np.sum(hist * lengths)) > huffman_cost(hist)


def _brute_force_limited(weights, max_bits):
    best = None
    for ls in product(range(1, max_bits + 1), repeat=len(weights)):
        if sum(2.0 ** -v for v in ls) <= 1:
            c = sum(w * v for w, v in zip(weights, ls))
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("weights,max_bits", [
    ([1, 1, 2, 4, 8, 16], 3), ([1, 2, 4, 8, 16, 32], 4), ([5, 5, 5, 5, 5], 3),
    ([1, 1, 1, 1, 100, 1000], 3), ([3, 1, 4, 1, 5, 9], 3), ([1, 2, 3, 5, 8, 13], 4),
    ([1, 1, 1, 1, 1, 1, 1, 1], 3),
])
def test_code_lengths_optimal_under_a_limit(weights, max_bits):
    """Package-merge is optimal under the limit: checked against exhaustive search."""
    hist = np.zeros(256, np.int64)
    syms = [3, 40, 41, 100, 200, 255, 7, 8][: len(weights)]
    hist[syms] = weights
    lengths = H.code_lengths(hist, max_bits=max_bits)
    _check_lengths(hist, lengths, max_bits)
    assert int(np.sum(hist * lengths)) == _brute_force_limited(weights, max_bits)


def test_code_lengths_all_symbols_uniform():
    lengths = H.code_lengths(np.full(256, 1000))
    assert (lengths == 8).all()


def _spec_reversed(lengths):
    out = np.zeros(256, np.int64)
    for s, (c, ln) in spec_canonical(lengths).items():
        out[s] = int(format(c, f"0{ln}b")[::-1], 2)
    return out


@pytest.mark.parametrize("hist", [geometric(), np.full(256, 3), np.bincount(bf16_exponents(10000),
                                                                          minlength=256)],
                         ids=["geometric", "uniform", "bf16"])
def test_canonical_codes_follow_length_symbol_order(hist):
    lengths = H.code_lengths(hist)
    codes = H.canonical_codes(lengths)
    np.testing.assert_array_equal(codes.astype(np.int64), _spec_reversed(lengths))
    # in (length, symbol) order the codes, left-aligned to 12 bits, count up one by one
    syms = sorted((int(lengths[s]), s) for s in range(256) if lengths[s])
    msb = [int(format(int(codes[s]), f"0{ln}b")[::-1], 2) << (12 - ln) for ln, s in syms]
    assert msb[0] == 0
    for (ln, _), a, b in zip(syms, msb, msb[1:]):
        assert b == a + (1 << (12 - ln))
    assert msb[-1] + (1 << (12 - syms[-1][0])) == 1 << 12


@pytest.mark.parametrize("bad", ["len13", "kraft_over", "kraft_under", "shape"])
def test_canonical_codes_rejects_bad_lengths(bad):
    lengths = np.zeros(256, np.uint8)
    lengths[[1, 2, 3]] = [1, 2, 2]
    if bad == "len13":
        lengths[[2, 3]] = [13, 13]
    elif bad == "kraft_over":
        lengths[9] = 12
    elif bad == "kraft_under":
        lengths[3] = 0
    else:
        lengths = lengths[:255]
    with pytest.raises(HuffmanError):
        H.canonical_codes(lengths)


def test_encode_with_shared_lengths():
    """Chunks of one plane coded with the plane's code: same 128 length bytes, each decodes."""
    plane = bf16_exponents(30_000, seed=11)
    lengths = H.code_lengths(np.bincount(plane, minlength=256))
    parts = [plane[:10_000], plane[10_000:20_000], plane[20_000:]]
    chunks = [H.encode(p, lengths=lengths) for p in parts]
    assert {c[:128] for c in chunks} == {spec_pack_lengths(lengths)}
    for p, c in zip(parts, chunks):
        assert H.encode(p, lengths=lengths, use_jit=False) == c
        check_chunk(p, c)
        for jit in (False, True):
            np.testing.assert_array_equal(dec(c, p.size, jit), p)
    # a chunk lacking some of the plane's symbols still uses (and records) the plane's code
    few = np.full(100, plane[0], np.uint8)
    c = H.encode(few, lengths=lengths)
    assert c[:128] == spec_pack_lengths(lengths)
    np.testing.assert_array_equal(dec(c, 100, True), few)


def test_encode_lengths_missing_a_symbol():
    lengths = H.code_lengths(np.bincount([1, 2, 2, 3, 3, 3], minlength=256))
    for jit in (False, True):
        with pytest.raises(ValueError):
            H.encode(np.array([1, 2, 7], np.uint8), lengths=lengths, use_jit=jit)
        bad = lengths.copy()
        bad[200] = 5          # not a complete prefix code
        with pytest.raises(ValueError):
            H.encode(np.array([1, 2, 3], np.uint8), lengths=bad, use_jit=jit)


# ---------------------------------------------------------------------------------------------
# corruption: HuffmanError or the SPEC's decoding, never a crash or a write out of bounds
# ---------------------------------------------------------------------------------------------
GUARD = 64


def decode_checked(chunk, n, jit):
    """Decode into a guarded buffer; returns bytes or None (HuffmanError)."""
    buf = np.full(n + 2 * GUARD, 0xA5, np.uint8)
    out = buf[GUARD:GUARD + n]
    try:
        got = H.decode(chunk, n, out=out, use_jit=jit)
        assert got is out
        res = out.tobytes()
    except HuffmanError:
        res = None
    assert (buf[:GUARD] == 0xA5).all() and (buf[GUARD + n:] == 0xA5).all(), "write out of bounds"
    return res


def agrees_with_spec(chunk, n):
    """Both paths agree with :func:`spec_decode`; returns whether the SPEC accepts the chunk."""
    want = spec_decode(chunk, n)
    for jit in (False, True):
        got = decode_checked(chunk, n, jit)
        if want is None:
            assert got is None, f"jit={jit}: accepted a chunk the SPEC rejects (n={n})"
        elif got is None:
            assert want[1], f"jit={jit}: rejected a valid chunk (n={n})"
        else:
            assert got == want[0], f"jit={jit}: wrong exponents (n={n})"
    return want is not None


def _sample_chunks():
    out = []
    for n, x in [(1000, bf16_exponents(1000, 1)), (333, skewed(333, 2)),
                 (600, np.random.default_rng(3).integers(0, 256, 600).astype(np.uint8)),
                 (97, np.random.default_rng(4).choice(np.arange(31) * 7 + 3, 97,
                                                      p=geometric()[np.arange(31) * 7 + 3]
                                                      / geometric().sum()).astype(np.uint8)),
                 (7, np.array([1, 2, 3, 1, 1, 1, 2], np.uint8))]:
        out.append((x, H.encode(x)))
    return out


SAMPLES = _sample_chunks()
SAMPLE_IDS = ["bf16", "skewed", "uniform", "geometric", "tiny"]


def _sizes(c):
    return list(struct.unpack_from("<4I", c, 128))


def _with_sizes(c, sizes):
    return c[:128] + struct.pack("<4I", *sizes) + c[HEAD:]


def _must_reject(chunk, n):
    assert spec_decode(chunk, n) is None     # the oracle agrees that it is malformed
    for jit in (False, True):
        assert decode_checked(chunk, n, jit) is None, f"jit={jit}"


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_truncated_chunk(i):
    x, c = SAMPLES[i]
    for k in sorted({0, 1, 127, 128, 143, HEAD, len(c) - 1, (len(c) + HEAD) // 2}):
        if k < len(c):
            _must_reject(c[:k], x.size)


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_stream_sizes_not_summing(i):
    x, c = SAMPLES[i]
    s = _sizes(c)
    for j in range(4):
        for d in (1, -1, 1 << 31):
            t = list(s)
            t[j] = (t[j] + d) % (1 << 32)
            _must_reject(_with_sizes(c, t), x.size)
    _must_reject(_with_sizes(c, [0xFFFFFFFF] * 4), x.size)
    _must_reject(c + b"\0", x.size)


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_stream_byte_added_or_removed(i):
    """A stream one byte longer (a zero byte appended, sizes consistent) or one byte shorter
    does not decode within exactly its bytes."""
    x, c = SAMPLES[i]
    s = _sizes(c)
    offs = np.cumsum([HEAD] + s)
    for j in range(4):
        t = list(s)
        t[j] += 1
        _must_reject(c[:128] + struct.pack("<4I", *t) + c[HEAD:offs[j + 1]] + b"\0" + c[offs[j + 1]:],
                     x.size)
        if s[j]:
            t[j] -= 2
            _must_reject(c[:128] + struct.pack("<4I", *t) + c[HEAD:offs[j + 1] - 1] + c[offs[j + 1]:],
                         x.size)


def _set_len(c, s, v):
    b = bytearray(c)
    sh = 4 * (s & 1)
    b[s // 2] = (b[s // 2] & ~(15 << sh) & 0xFF) | (v << sh)
    return bytes(b)


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_bad_code_lengths(i):
    x, c = SAMPLES[i]
    lengths = spec_unpack_lengths(c[:128])
    used = [s for s in range(256) if lengths[s]]
    absent = [s for s in range(256) if not lengths[s]]
    for v in (13, 14, 15):
        _must_reject(_set_len(c, used[0], v), x.size)
        _must_reject(_set_len(c, used[-1], v), x.size)
        if absent:
            _must_reject(_set_len(c, absent[0], v), x.size)
    if absent:
        _must_reject(_set_len(c, absent[-1], 12), x.size)           # Kraft sum > 1
    _must_reject(_set_len(c, used[-1], 0), x.size)                  # Kraft sum < 1
    longest = max(used, key=lambda s: (lengths[s], s))
    if lengths[longest] < 12:
        _must_reject(_set_len(c, longest, lengths[longest] + 1), x.size)   # Kraft sum < 1
    _must_reject(bytes(128) + c[128:], x.size)                      # no code at all


@pytest.mark.parametrize("bad", [bytes([0x0D]), bytes([0xF0]), bytes([0x01]), bytes([0x11, 0x01])])
def test_empty_chunk_with_bad_lengths(bad):
    """A chunk of 0 exponents: lengths above 12 or not a prefix code are malformed too."""
    _must_reject(bad + bytes(HEAD - len(bad)), 0)


def test_empty_chunk_edge_cases():
    _must_reject(bytes(HEAD) + b"\0", 0)                            # sizes do not add up
    _must_reject(bytes(128) + struct.pack("<4I", 1, 0, 0, 0) + b"\0", 0)   # non-empty stream
    _must_reject(bytes(HEAD), 1)                                    # 1 exponent, no code
    assert agrees_with_spec(bytes(HEAD), 0)


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_wrong_exponent_count(i):
    """n off by one (or more): rejected unless, as the SPEC allows, the streams happen to decode
    to that many exponents within exactly their bytes; then both paths give the SPEC's output."""
    x, c = SAMPLES[i]
    for n in (x.size - 1, x.size + 1, x.size + 4, x.size - 4, 2 * x.size + 3):
        agrees_with_spec(c, n)
    assert not agrees_with_spec(c, 0)          # streams with bytes for no exponent
    assert not agrees_with_spec(c, 64 * x.size + 64)   # far more exponents than bits


def test_wrong_exponent_count_detected_with_8_bit_codes():
    """With every code 8 bits long there is no padding: n +- 1 is always malformed."""
    x = np.random.default_rng(5).permutation(np.tile(np.arange(256, dtype=np.uint8), 20))
    c = H.encode(x)
    assert spec_unpack_lengths(c[:128]) == [8] * 256
    for n in (x.size - 1, x.size + 1):
        _must_reject(c, n)


@pytest.mark.parametrize("i", range(len(SAMPLES)), ids=SAMPLE_IDS)
def test_random_bit_flips(i):
    x, c = SAMPLES[i]
    rng = np.random.default_rng(100 + i)
    nbits = 8 * len(c)
    for t in range(60):
        b = bytearray(c)
        lo = 8 * HEAD if t % 3 else 0             # mostly stream bytes, sometimes the header
        for pos in rng.integers(lo, nbits, 1 + t % 3):
            b[pos >> 3] ^= 1 << (pos & 7)
        agrees_with_spec(bytes(b), x.size)


def test_random_garbage_chunks():
    """Random bytes with a consistent header: never a crash, always the SPEC's answer."""
    rng = np.random.default_rng(9)
    for t in range(60):
        n = int(rng.integers(0, 200))
        lengths = H.code_lengths(np.bincount(rng.integers(0, 1 + t, 50), minlength=256))
        sizes = [int(v) for v in rng.integers(0, 12, 4)]
        body = rng.integers(0, 256, sum(sizes)).astype(np.uint8).tobytes()
        agrees_with_spec(spec_pack_lengths(lengths) + struct.pack("<4I", *sizes) + body, n)


# ---------------------------------------------------------------------------------------------
# decode-table cache
# ---------------------------------------------------------------------------------------------
def _distinct_code_chunks(k, n=5000):
    out = []
    for t in range(k):
        rng = np.random.default_rng(t)
        x = (rng.geometric(0.15 + 0.1 * (t % 5), n) + 17 * t).astype(np.uint8)
        if t % 2:
            x[::7] = rng.integers(0, 256, x[::7].size)     # some long codes too
        out.append((x, H.encode(x)))
    assert len({c[:128] for _, c in out}) == k
    return out


def test_table_cache_more_codes_than_slots():
    chunks = _distinct_code_chunks(9)
    assert len(chunks) > _huffjit.CACHE_SLOTS
    rng = np.random.default_rng(0)
    order = list(range(9)) * 3 + [0, 8, 0, 8, 1, 7] + list(rng.integers(0, 9, 60))
    for i in order:                                   # the thread's cache, through decode()
        x, c = chunks[i]
        np.testing.assert_array_equal(H.decode(c, x.size), x)
    for slots in (1, 2, 4):                           # explicit caches, a bad chunk in between
        cache = _huffjit.TableCache(slots=slots)
        for j, i in enumerate(order):
            x, c = chunks[i]
            out = np.zeros(x.size, np.uint8)
            assert cache.decode(np.frombuffer(c, np.uint8), x.size, out) == 0
            np.testing.assert_array_equal(out, x)
            if j % 5 == 0:                            # invalid lengths take a slot and fail,
                bad = np.frombuffer(_set_len(c, int(x[0]), 15), np.uint8)
                assert cache.decode(bad, x.size, out) != 0
                assert cache.decode(bad, x.size, out) != 0    # every time


def test_table_cache_per_thread():
    chunks = _distinct_code_chunks(7)
    jobs = [chunks[i] for i in np.random.default_rng(1).integers(0, 7, 80)]
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda xc: H.decode(xc[1], xc[0].size), jobs))
    for (x, _), g in zip(jobs, got):
        np.testing.assert_array_equal(g, x)


# ---------------------------------------------------------------------------------------------
# the container (SPEC §4, §5.2) and the runtime decode path
# ---------------------------------------------------------------------------------------------
SPECIALS = [0x8000, 0x0000, 0x7F80, 0xFF80, 0x7FC1, 0xFF81, 0x0001, 0x807F]


def bf16_words(shape, seed):
    n = int(np.prod(shape))
    w = (np.random.default_rng(seed).normal(0, 0.02, n).astype(np.float32).view(np.uint32) >> 16)
    w = w.astype(np.uint16)
    w[: len(SPECIALS)] = SPECIALS[:n]
    return w.reshape(shape)


def _expert_pieces(layer, e, I, H_, seed):
    p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
    out = []
    for k, (w, role, shape) in enumerate((("w1", "gate", (I, H_)), ("w3", "up", (I, H_)),
                                          ("w2", "down", (H_, I)))):
        out.append(ExpertPiece(f"{p}.{w}.weight", "BF16", shape, role, bf16_words(shape, seed + k)))
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Dense bit-plane tensors in zstd, layer-0 experts in Huffman, layer-1 experts in zstd."""
    path = tmp_path_factory.mktemp("huff") / "mixed.zmoe"
    src = {}
    w = ZmoeWriter(path)
    for name, shape, codec in (("dense.zstd", (64, 70), "zstd"), ("dense.huff", (50, 30), "huffman"),
                               ("dense.huff1", (33,), "huffman")):
        a = bf16_words(shape, len(src))
        src[name] = a
        w.add_tensor(name, "BF16", shape, a, encoding="bitplane", chunks=3, min_chunk=1000,
                     exp_codec=codec)
    w.add_tensor("dense.raw", "BF16", (5,), bf16_words((5,), 99))
    src["dense.raw"] = bf16_words((5,), 99)
    for layer, codec in ((0, "huffman"), (1, "zstd")):
        for e in range(2):
            pieces = _expert_pieces(layer, e, 128, 96, 10 * layer + 3 * e)
            for p in pieces:
                src[p.name] = p.data
            w.write_expert(encode_expert(layer, e, pieces, chunks=4, min_chunk=2048,
                                         exp_codec=codec))
    w.close()
    return path, src


def _codec_of(name):
    return "zstd" if name == "dense.zstd" or ".layers.1." in name else "huffman"


def test_mixed_codecs_roundtrip(mixed):
    path, src = mixed
    with ZmoeReader(path) as r:
        assert r.header.version == 2 == zmoe.VERSION
        r.verify()
        for name, a in src.items():
            got = r.read_tensor(name)
            assert got.dtype == np.uint16 and got.shape == a.shape
            assert got.tobytes() == a.tobytes(), name
            rec = r.tensors[name]
            if name == "dense.raw":
                assert rec["encoding"] == "raw" and "exp_codec" not in rec
                continue
            assert rec["encoding"] == "bitplane" and rec["exp_codec"] == _codec_of(name)


def test_mixed_codecs_chunk_bytes(mixed):
    """Chunks in the file are what SPEC §5.2 says for their tensor's codec."""
    path, src = mixed
    b = path.read_bytes()
    ioff, isize = struct.unpack_from("<QQ", b, 8)
    index = json.loads(b[ioff:ioff + isize])
    seen = set()
    for t in index["tensors"]:
        if t["encoding"] != "bitplane":
            continue
        exp = ((src[t["name"]].reshape(-1).astype(np.uint32) >> 7) & 0xFF).astype(np.uint8)
        pos, heads = 0, set()
        for off, size, raw, crc in t["parts"][0]["exp"]:
            chunk = b[off:off + size]
            assert zlib.crc32(chunk) == crc
            if t["exp_codec"] == "zstd":
                assert zstd.frame_content_size(chunk) == raw
                assert zstd.ZstdDecompressor().decompress(chunk) == exp[pos:pos + raw].tobytes()
            else:
                got = spec_decode(chunk, raw)
                assert got is not None and got[0] == exp[pos:pos + raw].tobytes() and not got[1]
                heads.add(chunk[:128])
            pos += raw
        assert pos == exp.size
        if t["exp_codec"] == "huffman":
            assert len(heads) == 1      # zipmoe-rt: one code per tensor plane (SPEC §5.3)
        seen.add((t["exp_codec"], len(t["parts"][0]["exp"]) > 1))
    assert seen == {("zstd", True), ("huffman", True), ("huffman", False)}


def _rewrite_index(path, dst, fn):
    return mutate(path, dst, lambda b: rewrite_index(b, fn))


def _rec(index, name):
    return next(t for t in index["tensors"] if t["name"] == name)


@pytest.mark.parametrize("name", ["model.layers.0.block_sparse_moe.experts.1.w2.weight",
                                  "dense.zstd"])
def test_unknown_exp_codec(mixed, tmp_path, name):
    path, _ = mixed
    bad = _rewrite_index(path, tmp_path / "lz4.zmoe",
                         lambda ix: _rec(ix, name).__setitem__("exp_codec", "lz4"))
    with pytest.raises(UnsupportedCodecError) as ei:
        ZmoeReader(bad)
    msg = str(ei.value)
    assert name in msg and "lz4" in msg and str(bad) in msg


def test_v2_bitplane_without_exp_codec(mixed, tmp_path):
    path, _ = mixed
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    bad = _rewrite_index(path, tmp_path / "nocodec.zmoe", lambda ix: _rec(ix, name).pop("exp_codec"))
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert name in str(ei.value) and str(bad) in str(ei.value)


def test_runtime_decode_expert(mixed):
    """zipmoe_rt.engine.layout.decode_expert rebuilds Huffman (and zstd) experts bit for bit."""
    from zipmoe_rt.engine import layout as L_

    path, src = mixed
    with ZmoeReader(path) as r:
        layouts = L_.expert_layouts(r)
        assert sorted(layouts) == [(0, 0), (0, 1), (1, 0), (1, 1)]
        for (layer, e), lay in layouts.items():
            assert {p.codec for p in lay.pieces} == {"huffman" if layer == 0 else "zstd"}
            assert all(len(p.chunks) == 4 for p in lay.pieces)
            sm = r.view(*lay.sm_region)
            exp = r.view(*lay.exp_region)
            L_.check_regions(path, lay, sm, exp)
            for _ in range(2):    # the second time with the decode tables cached
                wts = L_.decode_expert(path, lay, sm, exp, zstd.ZstdDecompressor())
                p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
                for got, w in ((wts.gate, "w1"), (wts.up, "w3"), (wts.down, "w2")):
                    want = src[f"{p}.{w}.weight"]
                    assert got.view(np.uint16).shape == want.shape
                    assert got.view(np.uint16).tobytes() == want.tobytes()


def test_runtime_decode_expert_corrupt_huffman_chunk(mixed):
    """A Huffman chunk that does not decode (CRC not checked) is a ChecksumError naming it."""
    from zipmoe_rt.engine import layout as L_

    path, _ = mixed
    with ZmoeReader(path) as r:
        lay = L_.expert_layouts(r)[(0, 1)]
        exp = r.view(*lay.exp_region).copy()
        sm = r.view(*lay.sm_region)
        p = lay.pieces[2]
        o = p.chunks[1][0]
        exp[o + 128] ^= 1            # stream 0's size: the sizes no longer add up
        with pytest.raises(zmoe.ChecksumError) as ei:
            L_.decode_expert(path, lay, sm, exp, zstd.ZstdDecompressor())
        assert p.name in str(ei.value) and "chunk 1" in str(ei.value)


def test_public_names_for_the_runtime():
    # what zipmoe_rt's fused decode+merge kernel uses, under public names of zmoe.huffman
    from zmoe.huffman import DECODE_STATUS, decode_into, table_cache
    assert decode_into is _huffjit.decode_into
    assert DECODE_STATUS is _huffjit.STATUS and sorted(DECODE_STATUS) == [1, 2, 3, 4]
    tc = table_cache()
    assert tc is table_cache() and isinstance(tc, _huffjit.TableCache)
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(table_cache).result() is not tc          # one per thread
    x = np.random.default_rng(0).integers(100, 140, 5000).astype(np.uint8)
    chunk = np.frombuffer(H.encode(x), np.uint8)
    out = np.empty(x.size, np.uint8)
    assert decode_into(chunk, x.size, out, tc.keys, tc.ent, tc.len1, tc.state) == 0
    np.testing.assert_array_equal(out, x)
    bad = chunk[:100].copy()                                       # shorter than its header
    st = decode_into(bad, x.size, out, tc.keys, tc.ent, tc.len1, tc.state)
    assert DECODE_STATUS[st] == "chunk shorter than its header"
    with pytest.raises(HuffmanError, match="chunk shorter than its header"):
        H.decode(bad, x.size)
    with pytest.raises(AttributeError):
        H.no_such_name
    from zmoe import codec
    codec.check_codec("huffman")
    codec.check_codec("zstd")
    with pytest.raises(ValueError, match="unknown exponent codec 'lz4'"):
        codec.check_codec("lz4")
