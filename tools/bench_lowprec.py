#!/usr/bin/env python
"""Size and decode speed of the low-precision encodings on a real weight distribution
(format/SPEC.md §5.1 F8_E4M3 bit-planes; MXFP4 blocks and scales).

    python tools/bench_lowprec.py [MODEL.zmoe] [--experts 8] [--repeat 15]

Takes ``--experts`` experts of the model (default: the bundled default model, SmolLM2-135M
MoE-4), spread over its layers, and quantises their BF16 weights with each scheme:

- **FP8 E4M3 with 128x128 block scales** (DeepSeek-V3's release format, transformers'
  ``Fp8Quantize``: ``scale = 448 / max|w|`` per block, ``weight_scale_inv = 1 / scale``, the
  product rounded to nearest-even E4M3);
- **MXFP4** (OCP microscaling, gpt-oss's experts): per 32 consecutive weights of a row an e8m0
  scale ``2^(floor(log2 max|w|) - 2)`` and E2M1 values rounded to nearest-even, clamped to ±6.

Prints the stored bits per weight (FP8: exponent plane Huffman- or zstd-coded in 4 chunks + the
packed sign+mantissa plane + the F32 scales; MXFP4: the source bytes, scales raw or
Huffman-coded), the share of the source bytes, the same weights upcast to BF16 and stored as BF16
bit-planes (what a BF16 copy of such a release costs), and on one thread: the FP8 decode
(Huffman decode + nibble merge, the decode workers' job) and the dequantisation kernels, in
G weights/s (median of ``--repeat``), with the BF16 decode of the same experts measured in the
same run, alternating with the FP8 decode, as the baseline.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    import zipmoe_rt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmoe  # noqa: E402
from zmoe import codec, huffman  # noqa: E402
from zmoe.fp8 import E4M3_TO_F32  # noqa: E402
from zipmoe_rt.engine import layout as L  # noqa: E402
from zipmoe_rt.kernels import lowprec as K  # noqa: E402
from zipmoe_rt.kernels.planes import decode_merge_bf16_chunks  # noqa: E402

CHUNKS = 4
FP8_MAX = 448.0
_POS = E4M3_TO_F32[:0x7F]                 # codes 0x00..0x7E: 0 .. 448, increasing
_E2M1 = K.E2M1_TO_F32[:8]                 # codes 0..7: 0 .. 6, increasing


def _round_to_grid(a: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Codes (indices into the increasing ``grid``) of the non-negative ``a``, nearest value,
    ties to the even code (round-to-nearest-even: an even code has an even mantissa)."""
    hi = np.clip(np.searchsorted(grid, a), 1, grid.size - 1)
    lo = hi - 1
    dl, dh = a - grid[lo], grid[hi] - a
    pick_hi = (dh < dl) | ((dh == dl) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo).astype(np.uint8)


def quantize_fp8(w: np.ndarray, block=(128, 128)):
    """(E4M3 bytes uint8 [R, C], weight_scale_inv float32 [ceil(R/bm), ceil(C/bn)])."""
    R, C = w.shape
    bm, bn = block
    gr, gc = -(-R // bm), -(-C // bn)
    pad = np.zeros((gr * bm, gc * bn), np.float32)
    pad[:R, :C] = w
    amax = np.abs(pad.reshape(gr, bm, gc, bn)).max(axis=(1, 3))
    scale = np.where(amax > 0, np.float32(FP8_MAX) / np.where(amax > 0, amax, 1), 1).astype(np.float32)
    inv = (np.float32(1.0) / scale).astype(np.float32)
    x = w * np.repeat(np.repeat(scale, bm, 0), bn, 1)[:R, :C]
    x = np.clip(x, -FP8_MAX, FP8_MAX)
    q = _round_to_grid(np.abs(x), _POS) | (np.signbit(x).astype(np.uint8) << 7)
    return q, inv


def quantize_mxfp4(w: np.ndarray):
    """(blocks uint8 [R, C/32, 16], scales uint8 [R, C/32]) of ``w`` [R, C], C % 32 == 0."""
    R, C = w.shape
    g = w.reshape(R, C // 32, 32)
    amax = np.abs(g).max(axis=2)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    e = np.clip(e, -127, 127).astype(np.int32)
    x = np.clip(g / np.ldexp(np.float32(1), e)[..., None], -6, 6)
    code = _round_to_grid(np.abs(x), _E2M1) | (np.signbit(x).astype(np.uint8) << 3)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (e + 127).astype(np.uint8)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits (uint16), round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bitplane_bits(words: np.ndarray, dtype: str, exp_codec: str = "huffman") -> int:
    """Stored bits of a tensor as bit-planes (SM plane + coded exponent chunks)."""
    sm, chunks = codec.split_compress(words, dtype, CHUNKS, exp_codec=exp_codec)
    return 8 * (sm.size + sum(len(c) for c, _ in chunks))


def median_rate(fn, n, repeat) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return n / statistics.median(ts) / 1e9


def interleaved_rates(fns, n, repeat) -> list:
    """G weights/s of each of ``fns`` (``n`` weights each), median of ``repeat`` runs taken in
    turn (fn0, fn1, ..., fn0, fn1, ...)."""
    ts = [[] for _ in fns]
    for _ in range(repeat):
        for t, fn in zip(ts, fns):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [n / statistics.median(t) / 1e9 for t in ts]


def _chunk_arrays(chunks):
    blob = b"".join(c for c, _ in chunks)
    sizes = np.array([len(c) for c, _ in chunks], np.int64)
    offs = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    raws = np.array([r for _, r in chunks], np.int64)
    return np.frombuffer(blob, np.uint8), offs, sizes, raws


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=15)
    a = ap.parse_args(argv)
    if a.model is None:
        from zipmoe_rt.default_model import ensure_default_model
        a.model = ensure_default_model()
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(a.model, keep_experts=False)
    keys = sorted(src.layouts)
    pick = [keys[i * len(keys) // a.experts] for i in range(a.experts)]
    mats = []
    for layer, e in pick:
        w = src.expert(layer, e)
        mats += [np.ascontiguousarray(m).view(np.uint16) for m in (w.gate, w.up, w.down)]
    src.close()
    n = sum(m.size for m in mats)
    print(f"{a.model.name}: {a.experts} experts ({', '.join(f'{l}/{e}' for l, e in pick)}), "
          f"{len(mats)} tensors, {n / 1e6:.1f} M weights")
    f32 = [(m.astype(np.uint32) << 16).view(np.float32) for m in mats]

    bf16_bits = sum(bitplane_bits(m, "BF16") for m in mats)
    print(f"\nsource BF16 as BF16 bit-planes (huffman):    {bf16_bits / n:6.2f} bits/weight "
          f"({100 * bf16_bits / (16 * n):.1f} % of 16)")

    fp8 = [quantize_fp8(w) for w in f32]
    scale_bits = sum(32 * s.size for _, s in fp8)
    for exp_codec in zmoe.EXP_CODECS:
        bits = sum(bitplane_bits(q, "F8_E4M3", exp_codec) for q, _ in fp8) + scale_bits
        print(f"FP8 E4M3 128x128 as F8 bit-planes ({exp_codec:>7}): {bits / n:6.2f} bits/weight "
              f"({100 * bits / (8 * n + scale_bits):.1f} % of the source's {8 + scale_bits / n:.3f}"
              f" bits; weights alone {100 * (bits - scale_bits) / (8 * n):.1f} %)")
    hist = np.zeros(256, np.int64)
    for q, _ in fp8:
        hist += huffman.histogram((q >> 3) & 15)
    p = hist[hist > 0] / hist.sum()
    print(f"  FP8 exponent entropy {-(p * np.log2(p)).sum():.2f} bits (of 4)")
    up = [to_bf16(K.dequant_fp8(q, s, (128, 128))) for q, s in fp8]
    bits = sum(bitplane_bits(u, "BF16") for u in up)
    print(f"FP8 upcast to BF16, as BF16 bit-planes:       {bits / n:6.2f} bits/weight")

    mx = [quantize_mxfp4(w) for w in f32 if w.shape[1] % 32 == 0]
    nmx = sum(b.size * 2 for b, _ in mx)
    raw_bits = sum(8 * (b.size + s.size) for b, s in mx)
    coded = 0
    for _, s in mx:
        coded += 8 * sum(len(c) for c, _ in codec.compress_chunks(s.reshape(-1), CHUNKS))
    blocks_bits = sum(8 * b.size for b, _ in mx)
    print(f"MXFP4 as source bytes, scales raw:            {raw_bits / nmx:6.2f} bits/weight")
    print(f"MXFP4, scales Huffman-coded:                  {(blocks_bits + coded) / nmx:6.2f} "
          f"bits/weight ({100 * (blocks_bits + coded) / raw_bits:.1f} % of the source)")
    up = [to_bf16(K.dequant_mxfp4(b, s)) for b, s in mx]
    bits = sum(bitplane_bits(u, "BF16") for u in up)
    print(f"MXFP4 upcast to BF16, as BF16 bit-planes:     {bits / nmx:6.2f} bits/weight")

    # -- decode speed, one thread ---------------------------------------------------------
    tc = huffman.table_cache()
    f8 = []
    for q, _ in fp8:
        sm, chunks = codec.split_compress(q, "F8_E4M3", CHUNKS)
        f8.append((sm, *_chunk_arrays(chunks), np.empty(q.size, np.uint8)))
    bf = []
    for m in mats:
        sm, chunks = codec.split_compress(m, "BF16", CHUNKS)
        bf.append((sm, *_chunk_arrays(chunks), np.empty(m.size, np.uint16)))
    scratch = np.empty(max(int(r.max()) for *_, r, _ in f8 + bf), np.uint8)

    def dec_f8():
        for sm, exp, offs, sizes, raws, out in f8:
            bad, _ = K.decode_merge_f8_chunks(exp, offs, sizes, raws, sm, 0, out, scratch,
                                              tc.keys, tc.ent, tc.len1, tc.state)
            assert bad < 0

    def dec_bf16():
        for sm, exp, offs, sizes, raws, out in bf:
            bad, _ = decode_merge_bf16_chunks(exp, offs, sizes, raws, sm, out, scratch,
                                              tc.keys, tc.ent, tc.len1, tc.state)
            assert bad < 0

    outs = [np.empty(q.shape, np.float32) for q, _ in fp8]

    def deq_f8():
        for (q, s), o in zip(fp8, outs):
            K.dequant_fp8(q, s, (128, 128), o)

    mouts = [np.empty((b.shape[0], b.shape[1] * 32), np.float32) for b, _ in mx]

    def deq_mx():
        for (b, s), o in zip(mx, mouts):
            K.dequant_mxfp4(b, s, o)

    for fn in (dec_f8, dec_bf16, deq_f8, deq_mx):
        fn()    # JIT warm-up
    assert all(out.tobytes() == q.tobytes() for (q, _), (*_, out) in zip(fp8, f8))
    print("\none thread, G weights/s (median of %d; FP8 and BF16 decodes alternate, so a "
          "load that changes during the run hits both):" % a.repeat)
    r_f8, r_bf = interleaved_rates([dec_f8, dec_bf16], n, a.repeat)
    print(f"  FP8 bit-planes: Huffman decode + nibble merge  {r_f8:6.2f}")
    print(f"  BF16 bit-planes: Huffman decode + merge        {r_bf:6.2f}  (baseline; FP8 / BF16 "
          f"= {r_f8 / r_bf:.2f}x)")
    print(f"  FP8 -> float32 block dequantisation            {median_rate(deq_f8, n, a.repeat):6.2f}")
    print(f"  MXFP4 -> float32 dequantisation                {median_rate(deq_mx, nmx, a.repeat):6.2f}")


if __name__ == "__main__":
    main()
