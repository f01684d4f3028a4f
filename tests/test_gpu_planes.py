"""Bit-plane decoding on the GPU (zipmoe_rt/backends/cuda_planes.py): the plane merge over every
BF16 and F16 pattern (and F32 words), the Huffman exponent-chunk decoder against the host decoder
byte for byte (shared and own codes, empty and tiny chunks, corrupt chunks rejected as the host
rejects them), and every expert piece of a converted model against the engine's host decode.
Skipped with the reason shown without CuPy or a GPU."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from zipmoe_rt.backends import cuda_unavailable, get_backend

WHY = cuda_unavailable()
gpu = pytest.mark.skipif(WHY is not None, reason=f"no CUDA backend here: {WHY}")


def _bf16(a) -> np.ndarray:
    """float -> BF16 bits (truncation)."""
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# ------------------------------------------------------------------ bit planes (GPU)


@gpu
@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_merge_every_16_bit_pattern(dtype):
    """All 65,536 words: split on the host (zmoe.codec), merged on the GPU, equal bit for bit to
    the words and to the host merges (codec and the Numba kernel)."""
    from zmoe import codec

    from zipmoe_rt.kernels.planes import MERGE
    be = get_backend("cuda")
    words = np.arange(1 << 16, dtype=np.uint16)
    exp, sm = codec.split_planes(words, dtype)
    got = be.to_host(be.merge_planes(exp, sm, dtype))
    assert got.dtype == np.uint16 and np.array_equal(got, words)
    assert np.array_equal(got, codec.merge_planes(exp, sm, dtype))
    kern, _, wt = MERGE[dtype]
    host = np.empty(words.size, wt)
    kern(exp, sm, host)
    assert np.array_equal(got, host)
    # from device planes too, and a length that is not a multiple of the block
    got = be.to_host(be.merge_planes(be.from_host(exp[:1001]),
                                     be.from_host(sm[:1001 * sm.size // exp.size]), dtype))
    assert np.array_equal(got, words[:1001])


@gpu
def test_merge_f32_and_errors():
    from zmoe import codec
    be = get_backend("cuda")
    rng = np.random.default_rng(0)
    words = np.concatenate([rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32),
                            np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001,
                                      0x00000001, 0xFFFFFFFF], np.uint32)])
    exp, sm = codec.split_planes(words, "F32")
    got = be.to_host(be.merge_planes(exp, sm, "F32"))
    assert got.dtype == np.uint32 and np.array_equal(got, words)
    assert be.to_host(be.merge_planes(exp[:0], sm[:0], "BF16")).size == 0
    with pytest.raises(ValueError, match="sign\\+mantissa plane has 5 bytes, expected 4"):
        be.merge_planes(exp[:4], sm[:5], "BF16")
    with pytest.raises(ValueError, match="dtype 'F8'"):
        be.merge_planes(exp[:4], sm[:4], "F8")


def _chunk_buffer(rng):
    """Exponent chunks in one buffer with gaps: a plane of BF16 weights cut into chunks that
    share the plane's code (as the converter writes them), plus a chunk of 0, of 1 and of 3
    exponents (empty streams), one of a single symbol and one with a code of its own.
    Returns (buffer, offs, sizes, raws, exponents)."""
    from zmoe import huffman
    words = _bf16(rng.standard_normal(300_001) * 0.02)
    plane = ((words >> 7) & 0xFF).astype(np.uint8)
    shared = huffman.code_lengths(huffman.histogram(plane))
    parts = [plane[a:a + 70_000] for a in range(0, plane.size, 70_000)]
    chunks = [(huffman.encode(p, shared), p) for p in parts]
    for p in (plane[:0], plane[:1], plane[5:8], np.full(999, 121, np.uint8),
              rng.integers(100, 140, 5000).astype(np.uint8)):
        chunks.append((huffman.encode(p, shared if p.size < 4 else None), p))
    buf, offs, sizes, raws = [], [], [], []
    pos = 0
    for c, p in chunks:
        gap = rng.integers(0, 255, int(rng.integers(0, 9)), dtype=np.uint8).tobytes()
        buf.append(gap + c)
        offs.append(pos + len(gap))
        sizes.append(len(c))
        raws.append(p.size)
        pos += len(gap) + len(c)
    return (np.frombuffer(b"".join(buf), np.uint8).copy(), np.array(offs), np.array(sizes),
            np.array(raws), np.concatenate([p for _, p in chunks]))


@gpu
def test_huffman_decode_matches_the_host_decoder():
    from zmoe import huffman
    be = get_backend("cuda")
    buf, offs, sizes, raws, want = _chunk_buffer(np.random.default_rng(5))
    host = np.concatenate([huffman.decode(buf[o:o + z], int(n)) for o, z, n in
                           zip(offs, sizes, raws)])
    assert np.array_equal(host, want)
    got = be.to_host(be.decode_exponents(buf, offs, sizes, raws))
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    got = be.to_host(be.decode_exponents(be.from_host(buf), offs, sizes, raws))   # device buffer
    assert np.array_equal(got, want)
    # decode + merge with a sign+mantissa plane: the BF16 words
    words = np.random.default_rng(6).integers(0, 1 << 16, want.size, dtype=np.uint16)
    words = ((words & 0x807F) | (want.astype(np.uint16) << 7)).astype(np.uint16)
    from zmoe import codec
    exp, sm = codec.split_planes(words, "BF16")
    assert np.array_equal(exp, want)
    assert np.array_equal(be.to_host(be.decode_merge(buf, offs, sizes, raws, sm, "BF16")), words)


@gpu
def test_huffman_decode_rejects_what_the_host_rejects():
    from zmoe import huffman
    be = get_backend("cuda")
    rng = np.random.default_rng(7)
    plane = ((_bf16(rng.standard_normal(5000)) >> 7) & 0xFF).astype(np.uint8)
    good = bytearray(huffman.encode(plane))
    sizes = np.frombuffer(bytes(good[128:144]), np.uint32).copy()
    longer = bytearray(good + b"\0")                 # stream 3 one byte longer than its bits
    sizes[3] += 1
    longer[128:144] = sizes.tobytes()
    shorter = bytearray(good)                         # stream 0 cut: runs past its end
    sizes = np.frombuffer(bytes(good[128:144]), np.uint32).copy()
    cut = int(sizes[0]) // 2
    shorter = bytearray(good[:144] + good[144:144 + cut] + good[144 + int(sizes[0]):])
    sizes[0] = cut
    shorter[128:144] = sizes.tobytes()
    lengths = bytearray(good)           # one code a bit longer: no longer a complete code
    lengths[next(i for i in range(128) if 1 <= good[i] & 15 <= 11)] += 1
    for bad, msg in ((longer, huffman.DECODE_STATUS[3]), (shorter, huffman.DECODE_STATUS[3]),
                     (good[:-1], "do not add up"), (lengths, "complete prefix code")):
        arr = np.frombuffer(bytes(good) + bytes(bad), np.uint8)
        offs, szs, raws = [0, len(good)], [len(good), len(bad)], [plane.size, plane.size]
        with pytest.raises(ValueError):
            huffman.decode(bytes(bad), plane.size)
        with pytest.raises(huffman.HuffmanError, match=r"exponent chunk 1: .*" + msg):
            be.decode_exponents(arr, offs, szs, raws)
    with pytest.raises(ValueError, match="exponent chunk 0: outside"):
        be.decode_exponents(np.zeros(10, np.uint8), [4], [8], [3])


@gpu
def test_experts_of_a_container_decode_on_the_gpu(tiny_moe_dir, tmp_path):
    """Every expert piece of a converted model: exponent chunks decoded and merged on the GPU
    equal the host decode (the engine's), word for word."""
    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.engine import layout as L_
    from zipmoe_rt.engine.io import RegionReader
    from zipmoe_rt.engine.store import ZmoeSource
    import zstandard as zstd
    be = get_backend("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # no tokenizer.json in the tiny folder
        path = convert(tiny_moe_dir("qwen3_moe"), tmp_path / "m.zmoe", progress=False)
    src = ZmoeSource(path, keep_experts=False)
    rr = RegionReader(path)
    checked = 0
    try:
        for lay in src.layouts.values():
            sm, exp = rr.read(*lay.sm_region), rr.read(*lay.exp_region)
            host = L_.alloc_expert(lay)             # the engine's decode, piece by piece
            for pi, c0, c1 in lay.jobs:
                L_.decode_chunks(path, lay.pieces[pi], c0, c1, sm, exp, host[pi],
                                 zstd.ZstdDecompressor())
            for p, want in zip(lay.pieces, host):
                assert p.codec == "huffman" and p.chunks and p.dtype == "BF16"
                offs, sizes, raws, _ = p.chunk_arrays
                got = be.decode_merge(exp, offs, sizes, raws,
                                      sm[p.sm[0]:p.sm[0] + p.sm[1]], p.dtype)
                assert np.array_equal(be.to_host(got), want.reshape(-1).view(np.uint16))
                checked += 1
        n = len(src.layouts)
    finally:
        rr.close()
        src.close()
    assert n > 0 and checked >= 2 * n
