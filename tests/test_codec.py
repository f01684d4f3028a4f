"""Bit-plane codec (format/SPEC.md §5): exhaustive and property-based round trips, through both
exponent-chunk codecs (Huffman, the default, and zstd; §5.2).

Lossless means bit-exact: every comparison here is on the integer bit patterns, never on float
values (NaN != NaN, -0.0 == 0.0 would hide bugs).
"""
from __future__ import annotations

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zmoe import codec, huffman

CODECS = ["huffman", "zstd"]   # exponent-chunk codecs (SPEC §5.2)


def check_huffman_chunk(f, raw):
    """SPEC §5.3 layout of a Huffman chunk of ``raw`` exponents: 128 bytes of nibble-packed
    code lengths (a complete prefix code of <= 12 bits), 4 u32 stream sizes that add up."""
    assert len(f) >= 144
    ln = [(f[s // 2] >> (4 * (s & 1))) & 15 for s in range(256)]
    assert max(ln) <= 12
    if raw:
        assert sum(1 << (12 - v) for v in ln if v) == 1 << 12
    sizes = np.frombuffer(f[128:144], "<u4")
    assert 144 + int(sizes.sum()) == len(f)


def check_chunk(f, raw, expect, exp_codec):
    """One chunk decodes alone to ``expect`` and has its codec's framing."""
    if exp_codec == "zstd":
        # independent frame with its content size recorded, decodable alone
        assert zstd.frame_content_size(f) == raw
        assert zstd.ZstdDecompressor().decompress(f) == bytes(expect)
    else:
        check_huffman_chunk(f, raw)
        for jit in (False, True):
            assert huffman.decode(f, raw, use_jit=jit).tobytes() == bytes(expect)

# (E, M, word bytes, SM bytes) from the SPEC §5.1 table, written out here independently of the
# implementation's constants.
LAYOUT = {"BF16": (8, 7, 2, 1), "F16": (5, 10, 2, 2), "F32": (8, 23, 4, 3)}
WORD = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}


def spec_planes(words, dtype):
    """SPEC §5.1 formulas in plain Python ints: (exp bytes, sm bytes)."""
    e, m, _, sb = LAYOUT[dtype]
    exp = bytearray()
    sm = bytearray()
    for w in (int(x) for x in words):
        exp.append((w >> m) & ((1 << e) - 1))
        smv = (w >> (e + m)) << m | (w & ((1 << m) - 1))
        sm += smv.to_bytes(sb, "little")
    return bytes(exp), bytes(sm)


def spec_merge(exp, sm, dtype):
    e, m, _, sb = LAYOUT[dtype]
    out = []
    for i, x in enumerate(exp):
        smv = int.from_bytes(sm[i * sb:(i + 1) * sb], "little")
        out.append((smv >> m) << (e + m) | x << m | (smv & ((1 << m) - 1)))
    return out


def roundtrip_planes(words, dtype):
    exp, sm = codec.split_planes(words, dtype)
    e, m, wb, sb = LAYOUT[dtype]
    n = words.size
    assert exp.dtype == np.uint8 and exp.shape == (n,)
    assert sm.dtype == np.uint8 and sm.size == n * sb
    back = codec.merge_planes(exp, sm, dtype)
    assert back.dtype == WORD[dtype]
    return exp, sm, back


# ---------------------------------------------------------------------------------------------
# Exhaustive 16-bit round trips
# ---------------------------------------------------------------------------------------------
ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_all_16bit_patterns_roundtrip_planes(dtype):
    exp, sm, back = roundtrip_planes(ALL16, dtype)
    np.testing.assert_array_equal(back, ALL16)
    # every pattern also matches the SPEC formulas, evaluated vectorised here
    e, m, _, sb = LAYOUT[dtype]
    w = ALL16.astype(np.uint32)
    np.testing.assert_array_equal(exp, ((w >> m) & ((1 << e) - 1)).astype(np.uint8))
    smv = ((w >> (e + m)) << m) | (w & ((1 << m) - 1))
    want_sm = np.stack([(smv >> (8 * i)) & 0xFF for i in range(sb)], axis=1).astype(np.uint8).reshape(-1)
    np.testing.assert_array_equal(sm, want_sm)


@pytest.mark.parametrize("exp_codec", CODECS)
@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("chunks,min_chunk", [(1, 65536), (4, 1000), (7, 1)])
def test_all_16bit_patterns_roundtrip_compressed(dtype, chunks, min_chunk, exp_codec):
    exp, sm = codec.split_planes(ALL16, dtype)
    frames = codec.compress_chunks(exp, chunks, min_chunk, exp_codec=exp_codec)
    assert 1 <= len(frames) <= chunks
    assert sum(n for _, n in frames) == ALL16.size
    pos = 0
    for f, n in frames:
        check_chunk(f, n, exp[pos:pos + n], exp_codec)
        pos += n
    exp2 = codec.decompress_chunks([f for f, _ in frames], [n for _, n in frames],
                                   exp_codec=exp_codec)
    np.testing.assert_array_equal(exp2, exp)
    np.testing.assert_array_equal(codec.merge_planes(exp2, sm, dtype), ALL16)


def test_bf16_input_kinds_agree():
    """split_planes accepts the raw bytes or the uint16 words; both give the same planes."""
    e1, s1 = codec.split_planes(ALL16, "BF16")
    e2, s2 = codec.split_planes(ALL16.view(np.uint8), "BF16")
    e3, s3 = codec.split_planes(ALL16.reshape(256, 256), "BF16")
    for e, s in ((e2, s2), (e3, s3)):
        np.testing.assert_array_equal(e, e1)
        np.testing.assert_array_equal(s, s1)


def test_f16_float_input_keeps_nan_payloads():
    vals = ALL16.view(np.float16)
    exp, sm = codec.split_planes(vals, "F16")
    np.testing.assert_array_equal(codec.merge_planes(exp, sm, "F16"), ALL16)


# ---------------------------------------------------------------------------------------------
# FP32: random words and specials
# ---------------------------------------------------------------------------------------------
F32_SPECIALS = np.array([
    0x00000000, 0x80000000,                      # +0, -0
    0x7F800000, 0xFF800000,                      # +Inf, -Inf
    0x7FC00000, 0xFFC00000,                      # canonical quiet NaNs
    0x7FC12345, 0xFFFFFFFF, 0x7FFFFFFF,          # quiet NaNs with payloads
    0x7F800001, 0xFF800001, 0x7FA00000, 0x7FBFFFFF,  # signalling NaNs with payloads
    0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,  # subnormals
    0x00800000, 0x80800000,                      # min normals
    0x7F7FFFFF, 0xFF7FFFFF,                      # +-max
    0x3F800000, 0xBF800000, 0xC0490FDB,          # 1, -1, -pi
], dtype=np.uint32)


@pytest.mark.parametrize("exp_codec", CODECS)
def test_f32_specials_and_random_roundtrip(exp_codec):
    rng = np.random.default_rng(1234)
    words = np.concatenate([F32_SPECIALS, rng.integers(0, 1 << 32, 200_000, dtype=np.uint32)])
    exp, sm, back = roundtrip_planes(words, "F32")
    np.testing.assert_array_equal(back, words)
    # SPEC formulas on the specials, element by element
    se, ss = spec_planes(F32_SPECIALS, "F32")
    assert bytes(exp[:F32_SPECIALS.size]) == se
    assert bytes(sm[:3 * F32_SPECIALS.size]) == ss
    # through the compressed path too, with several chunks
    frames = codec.compress_chunks(exp, 5, 10_000, exp_codec=exp_codec)
    assert len(frames) == 5
    exp2 = codec.decompress_chunks([f for f, _ in frames], [n for _, n in frames],
                                   exp_codec=exp_codec)
    np.testing.assert_array_equal(codec.merge_planes(exp2, sm, "F32"), words)


def test_f32_float_input_keeps_signalling_nan():
    vals = F32_SPECIALS.view(np.float32)
    exp, sm = codec.split_planes(vals, "F32")
    np.testing.assert_array_equal(codec.merge_planes(exp, sm, "F32"), F32_SPECIALS)


# ---------------------------------------------------------------------------------------------
# SPEC §5.1 formulas on hand-picked words
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,word,exp,sm", [
    ("BF16", 0xC2F5, 0x85, b"\xF5"),             # -122.5: sign 1, exp 0x85, mantissa 0x75
    ("BF16", 0x3F80, 0x7F, b"\x00"),             # 1.0
    ("BF16", 0x8000, 0x00, b"\x80"),             # -0.0
    ("BF16", 0xFF80, 0xFF, b"\x80"),             # -Inf
    ("BF16", 0x7FC1, 0xFF, b"\x41"),             # NaN with payload
    ("BF16", 0x0001, 0x00, b"\x01"),             # smallest subnormal
    ("F16", 0xBC01, 0x0F, b"\x01\x04"),          # sign 1, exp 0x0F, mantissa 0x001 -> sm 0x401
    ("F16", 0x7C00, 0x1F, b"\x00\x00"),          # +Inf
    ("F16", 0xFE01, 0x1F, b"\x01\x06"),          # -NaN payload 0x201 -> sm 0x601
    ("F16", 0x8001, 0x00, b"\x01\x04"),          # negative subnormal
    ("F32", 0xC0490FDB, 0x80, b"\xDB\x0F\xC9"),  # -pi: sm = 1<<23 | 0x490FDB
    ("F32", 0x7F800001, 0xFF, b"\x01\x00\x00"),  # signalling NaN
    ("F32", 0x80000000, 0x00, b"\x00\x00\x80"),  # -0.0
    ("F32", 0x3F800000, 0x7F, b"\x00\x00\x00"),  # 1.0
])
def test_plane_formulas_hand_picked(dtype, word, exp, sm):
    w = np.array([word, word], dtype=WORD[dtype])
    e, s = codec.split_planes(w, dtype)
    assert e.tolist() == [exp, exp]
    assert bytes(s) == sm * 2
    assert (bytes(e[:1]), bytes(s[:len(sm)])) == spec_planes([word], dtype)
    assert codec.merge_planes(e, s, dtype).tolist() == [word, word]
    assert spec_merge(bytes(e[:1]), bytes(s[:len(sm)]), dtype) == [word]


def test_planes_are_in_row_major_element_order():
    w = np.array([[0x3F80, 0xC2F5], [0x0001, 0xFF80]], dtype=np.uint16)
    e, s = codec.split_planes(w, "BF16")
    assert e.tolist() == [0x7F, 0x85, 0x00, 0xFF]
    assert s.tolist() == [0x00, 0xF5, 0x01, 0x80]


# ---------------------------------------------------------------------------------------------
# chunking (SPEC §5.2)
# ---------------------------------------------------------------------------------------------
def spec_chunk_count(n, k, min_chunk=65536):
    return max(1, min(k, n // min_chunk))


@pytest.mark.parametrize("n,k,expected", [
    (0, 4, 1), (1, 4, 1), (65535, 4, 1), (65536, 4, 1), (131072, 4, 2), (131071, 4, 1),
    (4 * 65536, 4, 4), (100 * 65536, 4, 4), (7 * 65536, 7, 7), (7 * 65536 + 5, 7, 7),
])
def test_chunk_count_default_min_chunk(n, k, expected):
    b = codec.chunk_bounds(n, k)
    assert len(b) == expected == spec_chunk_count(n, k)
    if n:
        step = -(-n // expected)
        assert all(e - a == step for a, e in b[:-1])
        assert b[0][0] == 0 and b[-1][1] == n


def test_chunk_count_below_one_rejected():
    with pytest.raises(ValueError):
        codec.chunk_bounds(100, 0)


def _words_for(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    hi = 1 << (8 * LAYOUT[dtype][2])
    w = rng.integers(0, hi, n, dtype=np.uint64).astype(WORD[dtype])
    if n:  # salt with specials
        sp = {"BF16": [0x8000, 0x7F80, 0xFF81, 0x0001], "F16": [0x8000, 0x7C00, 0xFE01, 0x0001],
              "F32": [0x80000000, 0x7F800000, 0x7F800001, 0x00000001]}[dtype]
        idx = rng.integers(0, n, min(n, len(sp)))
        w[idx] = np.array(sp[:len(idx)], dtype=WORD[dtype])
    return w.reshape(shape)


@pytest.mark.parametrize("exp_codec", CODECS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(["BF16", "F16", "F32"]),
       shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
       chunks=st.integers(1, 50),
       min_chunk=st.integers(1, 70),
       seed=st.integers(0, 2**32 - 1))
def test_roundtrip_property(exp_codec, dtype, shape, chunks, min_chunk, seed):
    words = _words_for(dtype, shape, seed)
    n = words.size
    b = codec.chunk_bounds(n, chunks, min_chunk)
    # covers [0, n) contiguously with at most K chunks, sized per SPEC §5.2
    assert 1 <= len(b) <= chunks
    assert b[0][0] == 0 and b[-1][1] == n
    assert all(b[i][1] == b[i + 1][0] for i in range(len(b) - 1))
    if n:
        k = spec_chunk_count(n, chunks, min_chunk)
        step = -(-n // k)
        assert all(e - a == step for a, e in b[:-1])
        assert 0 < b[-1][1] - b[-1][0] <= step
        assert len(b) <= k
    exp, sm, back = roundtrip_planes(words, dtype)
    np.testing.assert_array_equal(back, words.reshape(-1))
    frames = codec.compress_chunks(exp, chunks, min_chunk, exp_codec=exp_codec)
    assert [n_ for _, n_ in frames] == [e - a for a, e in b]
    for (f, n_), (a, e) in zip(frames, b):
        check_chunk(f, n_, exp[a:e], exp_codec)
    if exp_codec == "huffman" and n:
        # zipmoe-rt codes every chunk of a plane with the plane's code (SPEC §5.3)
        assert len({f[:128] for f, _ in frames}) == 1
    exp2 = codec.decompress_chunks([f for f, _ in frames], [n_ for _, n_ in frames],
                                   exp_codec=exp_codec)
    np.testing.assert_array_equal(exp2, exp)
    np.testing.assert_array_equal(codec.merge_planes(exp2, sm, dtype), words.reshape(-1))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 10**7), chunks=st.integers(1, 64), min_chunk=st.integers(1, 200_000))
def test_chunk_bounds_property(n, chunks, min_chunk):
    b = codec.chunk_bounds(n, chunks, min_chunk)
    assert 1 <= len(b) <= chunks
    assert b[0][0] == 0 and b[-1][1] == n
    assert all(b[i][1] == b[i + 1][0] and b[i][0] < b[i][1] for i in range(len(b) - 1))
    assert len(b) <= spec_chunk_count(n, chunks, min_chunk)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["F64", "I32", "BOOL", "F8_E5M2", "bf16", ""])
def test_split_unsupported_dtype(dtype):
    with pytest.raises(ValueError):
        codec.split_planes(np.zeros(8, np.uint16), dtype)


@pytest.mark.parametrize("dtype", ["F64", "I32", "BOOL", "F8_E5M2", "bf16"])
def test_merge_unsupported_dtype(dtype):
    with pytest.raises(ValueError):
        codec.merge_planes(np.zeros(8, np.uint8), np.zeros(8, np.uint8), dtype)


def test_is_bitplane_dtype():
    assert [d for d in ("BF16", "F16", "F32", "F64", "I64", "BOOL", "F8_E5M2")
            if codec.is_bitplane_dtype(d)] == ["BF16", "F16", "F32"]


def test_split_partial_word_rejected():
    with pytest.raises(ValueError):
        codec.split_planes(np.zeros(5, np.uint8), "BF16")
    with pytest.raises(ValueError):
        codec.split_planes(np.zeros(6, np.uint8), "F32")


@pytest.mark.parametrize("dtype,bad_sm", [("BF16", 9), ("F16", 15), ("F32", 25)])
def test_merge_plane_size_mismatch(dtype, bad_sm):
    with pytest.raises(ValueError):
        codec.merge_planes(np.zeros(8, np.uint8), np.zeros(bad_sm, np.uint8), dtype)


@pytest.mark.parametrize("exp_codec", CODECS)
@pytest.mark.parametrize("data", ["narrow", "all_bytes"])
def test_decompress_detects_wrong_raw_size_and_garbage(exp_codec, data):
    rng = np.random.default_rng(0)
    if data == "narrow":
        exp = rng.integers(120, 130, 5000).astype(np.uint8)
    else:  # every byte value 20 times: a Huffman code of 8-bit codes, streams without padding
        exp = rng.permutation(np.tile(np.arange(256, dtype=np.uint8), 20))
    (frame, n), = codec.compress_chunks(exp, 1, exp_codec=exp_codec)
    assert n == exp.size
    np.testing.assert_array_equal(codec.decompress_chunks([frame], [n], exp_codec=exp_codec), exp)
    # A zstd frame records its content size, so any wrong raw_size is caught. A Huffman chunk
    # does not: raw_size +- 1 is caught only when the streams cannot decode that many exponents
    # within exactly their bytes (SPEC §5.3); with 8-bit codes and no padding it never can.
    if exp_codec == "zstd" or data == "all_bytes":
        with pytest.raises(ValueError):
            codec.decompress_chunks([frame], [n + 1], exp_codec=exp_codec)
        with pytest.raises(ValueError):
            codec.decompress_chunks([frame], [n - 1], exp_codec=exp_codec)
    with pytest.raises(ValueError):
        codec.decompress_chunks([frame], [2 * n + 7], exp_codec=exp_codec)
    with pytest.raises(ValueError):
        codec.decompress_chunks([b"\x00" * len(frame)], [n], exp_codec=exp_codec)
    with pytest.raises(ValueError):
        codec.decompress_chunks([frame[: len(frame) // 2]], [n], exp_codec=exp_codec)
    # Huffman: the stream sizes must add up to the chunk; zstd: a chunk is one frame, nothing after
    with pytest.raises(ValueError):
        codec.decompress_chunks([frame + b"\x00"], [n], exp_codec=exp_codec)


def _zstd_frame_header(content_size: int) -> bytes:
    """A zstd frame (RFC 8878 §3.1.1) declaring ``content_size`` bytes (8-byte field, single
    segment), followed by one empty last raw block."""
    import struct
    return (struct.pack("<IB", 0xFD2FB528, 0b11100000) + struct.pack("<Q", content_size)
            + b"\x01\0\0")


@pytest.mark.parametrize("declared", [1 << 40, 1 << 33, 5001, 4999])
def test_zstd_declared_size_is_checked_before_anything_is_allocated(declared):
    """A frame's declared content size is what zstd allocates: it must equal raw_size before
    the frame is decompressed (1 TiB used to raise MemoryError, or allocate)."""
    frame = _zstd_frame_header(declared)
    assert zstd.get_frame_parameters(frame).content_size == declared
    with pytest.raises(ValueError, match=f"zstd frame declares {declared} bytes, expected "
                                         f"raw_size 5000"):
        codec.decompress_chunk(frame, 5000, "zstd")


def test_zstd_frame_without_content_size_is_refused():
    frame = zstd.ZstdCompressor(write_content_size=False).compress(b"\x7f" * 5000)
    with pytest.raises(ValueError, match="zstd frame declares no size"):
        codec.decompress_chunk(frame, 5000, "zstd")
    ok = zstd.ZstdCompressor(write_content_size=True).compress(b"\x7f" * 5000)
    assert codec.decompress_chunk(ok, 5000, "zstd").tolist() == [0x7F] * 5000


def test_default_codec_is_huffman():
    exp = np.random.default_rng(1).integers(118, 131, 3000).astype(np.uint8)
    assert codec.compress_chunks(exp, 1) == codec.compress_chunks(exp, 1, exp_codec="huffman")
    (f, n), = codec.compress_chunks(exp, 1)
    check_huffman_chunk(f, n)
    np.testing.assert_array_equal(codec.decompress_chunk(f, n), exp)
    np.testing.assert_array_equal(codec.decompress_chunks([f], [n]), exp)


def test_unknown_codec_rejected():
    exp = np.zeros(10, np.uint8)
    (f, n), = codec.compress_chunks(exp, 1)
    with pytest.raises(ValueError, match="lz4"):
        codec.compress_chunks(exp, 1, exp_codec="lz4")
    with pytest.raises(ValueError, match="lz4"):
        codec.decompress_chunk(f, n, exp_codec="lz4")
    with pytest.raises(ValueError, match="lz4"):
        codec.decompress_chunks([f], [n], exp_codec="lz4")


def test_chunk_of_one_codec_is_not_read_as_the_other():
    exp = np.random.default_rng(2).integers(118, 131, 3000).astype(np.uint8)
    (fz, n), = codec.compress_chunks(exp, 1, exp_codec="zstd")
    (fh, _), = codec.compress_chunks(exp, 1, exp_codec="huffman")
    with pytest.raises(ValueError):
        codec.decompress_chunk(fz, n, exp_codec="huffman")
    with pytest.raises(ValueError):
        codec.decompress_chunk(fh, n, exp_codec="zstd")


@pytest.mark.parametrize("exp_codec", CODECS)
def test_exponent_plane_compresses_normal_weights(exp_codec):
    """Sanity of the codecs: exponents of N(0, 0.02) BF16 weights code well under 8 bits
    (~2.6 bits, SPEC §5.2), Huffman within a tenth of a bit of the order-0 entropy."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(200_000).astype(np.float32) * 0.02).view(np.uint32) >> 16
    exp, _ = codec.split_planes(w.astype(np.uint16), "BF16")
    frames = codec.compress_chunks(exp, 1, exp_codec=exp_codec)
    bits = 8 * sum(len(f) for f, _ in frames) / exp.size
    assert bits < 4.0
    if exp_codec == "huffman":
        p = np.bincount(exp, minlength=256) / exp.size
        entropy = float(-np.sum(p[p > 0] * np.log2(p[p > 0])))
        assert entropy < bits < entropy + 0.1


# ---------------------------------------------------------------------------------------------
# streaming: same bytes as whole-array code, memory bounded by the planes plus one chunk
# ---------------------------------------------------------------------------------------------
def whole_array_split(words, dtype):
    """The former whole-array split (numpy on every element at once): the reference bytes."""
    e, m, wb, sb = LAYOUT[dtype]
    w = np.ascontiguousarray(words).reshape(-1).view(np.uint8).view(WORD[dtype])
    exp = ((w >> m) & ((1 << e) - 1)).astype(np.uint8)
    smv = ((w >> (e + m)) << m) | (w & ((1 << m) - 1))
    sm = smv.astype(WORD[dtype]).view(np.uint8).reshape(-1, wb)[:, :sb].reshape(-1)
    return exp, np.ascontiguousarray(sm)


def whole_array_merge(exp, sm, dtype):
    e, m, wb, sb = LAYOUT[dtype]
    wt = WORD[dtype]
    b = sm.reshape(-1, sb).astype(wt)
    smv = sum(b[:, i] << (8 * i) for i in range(sb)).astype(wt)
    return (((smv >> m) << (e + m)) | (exp.astype(wt) << m) | (smv & ((1 << m) - 1))).astype(wt)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("n", [0, 1, 999, 1000, 1001, 4097])
def test_streamed_split_and_merge_match_whole_array_code(dtype, n, monkeypatch):
    """Blocks of 1000 elements (boundaries inside, at and past the end of the data) give the
    bytes of the whole-array code, for random words of every bit pattern, NaNs and infinities
    included; corrupt planes (exponent bytes past the field, SM bits past the sign) merge to
    the same words as the whole-array code too."""
    monkeypatch.setattr(codec, "STREAM_ELEMENTS", 1000)
    rng = np.random.default_rng(n)
    wt = WORD[dtype]
    words = rng.integers(0, np.iinfo(wt).max, n, dtype=wt, endpoint=True)
    exp, sm = codec.split_planes(words, dtype)
    want_exp, want_sm = whole_array_split(words, dtype)
    assert exp.tobytes() == want_exp.tobytes() and sm.tobytes() == want_sm.tobytes()
    np.testing.assert_array_equal(codec.merge_planes(exp, sm, dtype), words)
    bad_exp = rng.integers(0, 256, n, dtype=np.uint8)
    bad_sm = rng.integers(0, 256, sm.size, dtype=np.uint8)
    np.testing.assert_array_equal(codec.merge_planes(bad_exp, bad_sm, dtype),
                                  whole_array_merge(bad_exp, bad_sm, dtype))
    out = np.full(n, 7, wt)
    assert codec.merge_planes(exp, sm, dtype, out=out) is out
    np.testing.assert_array_equal(out, words)


@pytest.mark.parametrize("exp_codec", CODECS)
@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_merge_chunks_matches_decompress_then_merge(dtype, exp_codec, monkeypatch):
    monkeypatch.setattr(codec, "STREAM_ELEMENTS", 777)
    words = np.random.default_rng(3).integers(0, 2**16, 10_000).astype(WORD[dtype])
    exp, sm = codec.split_planes(words, dtype)
    frames = codec.compress_chunks(exp, 7, 1, exp_codec=exp_codec)
    sizes = [n for _, n in frames]
    got = codec.merge_chunks([f for f, _ in frames], sizes, sm, dtype, exp_codec)
    np.testing.assert_array_equal(got, words)
    with pytest.raises(ValueError, match="do not match"):
        codec.merge_chunks([f for f, _ in frames], sizes[:-1] + [sizes[-1] + 1], sm, dtype,
                           exp_codec)
    with pytest.raises(ValueError, match="do not match"):
        codec.merge_chunks([f for f, _ in frames][:-1], sizes, sm, dtype, exp_codec)


def test_histogram_in_blocks_equals_bincount(monkeypatch):
    monkeypatch.setattr(huffman, "HIST_BLOCK", 1000)
    x = np.random.default_rng(4).integers(0, 256, 12_345).astype(np.uint8)
    np.testing.assert_array_equal(huffman.histogram(x), np.bincount(x, minlength=256))
    # the chunks a plane codes to do not change with the counting
    exp = (np.random.default_rng(5).standard_normal(300_000) * 4 + 120).astype(np.uint8)
    monkeypatch.setattr(huffman, "HIST_BLOCK", 1 << 30)
    whole = codec.compress_chunks(exp, 3, 1)
    monkeypatch.setattr(huffman, "HIST_BLOCK", 1000)
    assert codec.compress_chunks(exp, 3, 1) == whole
    assert list(codec.iter_compress_chunks(exp, 3, 1)) == whole


MiB = 1 << 20
BIG = 64 * MiB       # bytes of the tensor in the memory tests
BIG_CHUNKS = 16      # exponent chunks of the stored tensor: one chunk is BIG / 16 = 4 MiB


def _big_words(dtype):
    """BIG bytes of normal-looking weights as words of ``dtype`` (BF16: the top half of F32)."""
    rng = np.random.default_rng(0)
    if dtype == "F32":
        return rng.standard_normal(BIG // 4, dtype=np.float32).view(np.uint32)
    if dtype == "F16":
        return rng.standard_normal(BIG // 4, dtype=np.float32).astype(np.float16).view(np.uint16)
    f = rng.standard_normal(BIG // 4, dtype=np.float32)
    return np.concatenate([f, f[::-1]]).view(np.uint32).__rshift__(16).astype(np.uint16)


def _traced_peak(fn):
    """(result, peak bytes allocated while ``fn`` ran), with tracemalloc (numpy reports its
    array allocations to it); what existed before the call is not counted."""
    import tracemalloc
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_split_and_merge_memory_is_the_planes_plus_one_block(dtype):
    """On a 64 MiB tensor, splitting peaks at its planes (1x the tensor's bytes, 1.5x for F16)
    plus two blocks of words, and merging at the output words plus the same: at most 1.5x the
    tensor plus one chunk (whole-array numpy code peaked at 3.5x and 5x)."""
    words = _big_words(dtype)
    chunk = BIG // BIG_CHUNKS
    (exp, sm), peak = _traced_peak(lambda: codec.split_planes(words, dtype))
    assert peak <= exp.nbytes + sm.nbytes + 2 * codec.STREAM_ELEMENTS * words.itemsize + 4096
    assert peak <= 1.5 * BIG + chunk
    back, peak = _traced_peak(lambda: codec.merge_planes(exp, sm, dtype))
    assert peak <= BIG + 2 * codec.STREAM_ELEMENTS * words.itemsize + 4096
    assert np.array_equal(back, words)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_writer_and_reader_memory_is_at_most_1_5x_the_tensor_plus_one_chunk(dtype, tmp_path):
    """Storing a 64 MiB bit-plane tensor (ZmoeWriter.add_tensor, Huffman chunks) and reading it
    back (ZmoeReader.read_tensor), and encoding it as an expert (encode_expert, BF16 as experts
    are) each peak at <= 1.5x its bytes plus one exponent chunk's elements."""
    import zmoe
    words = _big_words(dtype)
    chunk = BIG // BIG_CHUNKS
    path = tmp_path / "big.zmoe"

    def write():
        with zmoe.ZmoeWriter(path) as w:
            w.add_tensor("t", dtype, (words.size,), words, encoding="bitplane", chunks=BIG_CHUNKS)
    _, peak = _traced_peak(write)
    assert peak <= 1.5 * BIG + chunk, peak / BIG
    with zmoe.ZmoeReader(path) as r:
        got, peak = _traced_peak(lambda: r.read_tensor("t"))
        assert peak <= 1.5 * BIG + chunk, peak / BIG
        assert np.array_equal(got.view(words.dtype), words)
        del got
    if dtype == "BF16":
        piece = zmoe.ExpertPiece("t", dtype, (words.size,), "gate", words)
        _, peak = _traced_peak(lambda: zmoe.encode_expert(0, 0, [piece], chunks=BIG_CHUNKS))
        assert peak <= 1.5 * BIG + chunk, peak / BIG


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("exp_codec", ["huffman", "zstd"])
def test_split_compress_equals_split_then_compress(dtype, exp_codec):
    """The chunk-by-chunk split (encode_expert's path) gives the bytes of the whole-plane split
    and compression: the same sign+mantissa plane, the same chunks (Huffman: the whole plane's
    code), for sizes that are and are not a multiple of the chunk."""
    rng = np.random.default_rng(3)
    wt = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}[dtype]
    for n in (1, 1000, 70_001):
        words = rng.integers(0, np.iinfo(wt).max, n, dtype=np.uint64).astype(wt)
        words[: n // 2] &= wt(0x80FF) if wt is np.uint16 else wt(0x807FFFFF)   # skew the exponents
        sm, parts = codec.split_compress(words, dtype, 7, 64, exp_codec=exp_codec)
        exp, sm0 = codec.split_planes(words, dtype)
        assert np.array_equal(sm, sm0)
        want = codec.compress_chunks(exp, 7, 64, exp_codec=exp_codec)
        assert [(bytes(c), r) for c, r in parts] == [(bytes(c), r) for c, r in want]


def test_encode_expert_f16_memory_is_at_most_1_5x_plus_one_chunk():
    """F16 experts too: the exponent plane is never held whole (its sign+mantissa plane alone
    is 1x the tensor)."""
    import zmoe
    words = _big_words("F16")
    chunk = BIG // BIG_CHUNKS
    piece = zmoe.ExpertPiece("t", "F16", (words.size,), "gate", words)
    enc, peak = _traced_peak(lambda: zmoe.encode_expert(0, 0, [piece], chunks=BIG_CHUNKS))
    assert peak <= 1.5 * BIG + chunk, peak / BIG
    exp, sm = codec.split_planes(words, "F16")
    assert np.array_equal(enc.sm[0], sm)
