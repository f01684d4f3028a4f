"""The parallel Huffman stream decoder of the CUDA backend (zipmoe_rt/backends/cuda_huffman.py):
one thread per segment of a stream, synchronised, equal byte for byte to the host decoder and to
the one-thread-per-stream kernel, at segment sizes that force many resynchronisation passes, on
real-value exponent planes and on corrupt streams (rejected as the host rejects them). Skipped
with the reason shown without CuPy or a GPU; tests/test_gpu_planes.py runs the same decoder
through ``decode_exponents``."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.backends import cuda_unavailable, get_backend

WHY = cuda_unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no CUDA backend here: {WHY}")


def _chunks(rng, n=120_001, piece=25_000):
    """(buffer, offs, sizes, raws, exponents): a BF16 plane in chunks sharing its code, plus
    chunks of 0, 1, 3 exponents, one symbol, and one with its own code."""
    from zmoe import huffman
    w = (rng.standard_normal(n) * 0.02 * np.exp(0.5 * rng.standard_normal(n))).astype(np.float32)
    plane = ((w.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)
    shared = huffman.code_lengths(huffman.histogram(plane))
    parts = [plane[a:a + piece] for a in range(0, n, piece)]
    coded = [huffman.encode(p, shared) for p in parts]
    for p in (plane[:0], plane[:1], plane[5:8], np.full(999, 121, np.uint8),
              rng.integers(100, 140, 3000).astype(np.uint8)):
        parts.append(p)
        coded.append(huffman.encode(p, shared if 0 < p.size < 4 else None))
    sizes = np.array([len(c) for c in coded])
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return (np.frombuffer(b"".join(coded), np.uint8).copy(), offs, sizes,
            np.array([p.size for p in parts]), np.concatenate(parts))


@pytest.mark.parametrize("seg_bits", [16, 64, 1024, 1 << 20])
def test_parallel_decode_equals_host_and_serial(monkeypatch, seg_bits):
    from zipmoe_rt.backends import cuda_huffman
    be = get_backend("cuda")
    buf, offs, sizes, raws, want = _chunks(np.random.default_rng(seg_bits))
    monkeypatch.setattr(cuda_huffman, "SEG_BITS", seg_bits)
    got = be.to_host(be.decode_exponents(buf, offs, sizes, raws))
    assert np.array_equal(got, want)
    monkeypatch.setattr(cuda_huffman, "PARALLEL", False)
    assert np.array_equal(be.to_host(be.decode_exponents(buf, offs, sizes, raws)), want)


def test_corrupt_streams_rejected_as_the_host_and_serial_kernel(monkeypatch):
    """Flipped bytes, a stream cut short and a count one too high: the parallel decoder, the
    serial kernel and the host decoder accept or reject each chunk alike (same message)."""
    from zmoe import huffman

    from zipmoe_rt.backends import cuda_huffman
    be = get_backend("cuda")
    monkeypatch.setattr(cuda_huffman, "SEG_BITS", 64)
    rng = np.random.default_rng(9)
    buf, offs, sizes, raws, _ = _chunks(rng, 60_000, 20_000)
    cases = []
    for i in range(3):
        b = buf.copy()
        b[offs[i] + huffman.HEADER_BYTES + 7 + 31 * i] ^= 0x5A
        cases.append((b, raws))
    r2 = raws.copy()
    r2[1] += 1
    cases.append((buf, r2))
    s2 = sizes.copy()
    s2[0] -= 1
    cases.append((buf, raws, s2))
    seen = set()
    for case in cases:
        b, r = case[0], case[1]
        sz = case[2] if len(case) > 2 else sizes
        msgs = []
        for parallel in (True, False):
            monkeypatch.setattr(cuda_huffman, "PARALLEL", parallel)
            try:
                be.decode_exponents(b, offs, sz, r)
                msgs.append(None)
            except huffman.HuffmanError as e:
                msgs.append(str(e))
        host = None
        for i, (o, z, n) in enumerate(zip(offs, sz, r)):
            try:
                huffman.decode(b[o:o + z], int(n))
            except huffman.HuffmanError:
                host = i
                break
        assert msgs[0] == msgs[1]
        assert (msgs[0] is None) == (host is None)
        if host is not None:
            assert msgs[0].startswith(f"exponent chunk {host}:")
        seen.add(msgs[0] is None)
    assert False in seen


def test_real_value_planes_many_streams():
    """Exponent planes of BF16 weights of several scales coded as the converter codes them
    (4 chunks per tensor): the parallel decoder gives the host's bytes."""
    from zmoe import codec
    be = get_backend("cuda")
    rng = np.random.default_rng(1)
    chunks, want = [], []
    for scale in (0.002, 0.02, 0.3):
        w = (rng.standard_normal(400_000) * scale).astype(np.float32)
        exp, _ = codec.split_planes((w.view(np.uint32) >> 16).astype(np.uint16), "BF16")
        chunks += codec.compress_chunks(exp, 4, min_chunk=1 << 14)
        want.append(exp)
    sizes = np.array([len(c) for c, _ in chunks])
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    buf = np.frombuffer(b"".join(c for c, _ in chunks), np.uint8)
    got = be.to_host(be.decode_exponents(buf, offs, sizes, [r for _, r in chunks]))
    assert np.array_equal(got, np.concatenate(want))
