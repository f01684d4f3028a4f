#!/usr/bin/env python
"""Decode + merge throughput of experts on one core, and compression ratio, for both exponent
codecs (design note §1; format/SPEC.md §5.2-§5.3).

    python tools/bench_codec.py [MODEL.zmoe] [--repeat 30] [--threads 1 2]

Takes a few experts of the model, splits them into planes and codes their exponent planes with
each codec (Huffman and zstd, the file's chunk sizes), then times, from buffers already in
memory, what a decode worker does: decode every exponent chunk and merge it with the
sign+mantissa plane in the Numba kernel (``engine.layout.decode_expert``). Prints G weights/s
per core (median of ``--repeat``) beside the exponent decode alone and the plain-numpy reference
merge, all in the same run. With several threads, each decodes its own experts concurrently
(the decode workers). Default model: the bundled one (built on first use).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import zstandard as zstd

try:
    import zipmoe_rt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmoe  # noqa: E402
from zmoe import codec  # noqa: E402
from zipmoe_rt.engine import layout as L  # noqa: E402


def recode(lay, exp, exp_codec):
    """The expert's exponent planes re-coded with ``exp_codec`` (same chunk sizes): a new layout
    and exponent buffer (the SM region is unchanged)."""
    d = zstd.ZstdDecompressor()
    pieces, blobs, pos = [], [], 0
    for p in lay.pieces:
        if p.raw:
            pieces.append(p)
            continue
        plane = codec.decompress_chunks([exp[o:o + n] for o, n, _, _ in p.chunks],
                                        [raw for _, _, raw, _ in p.chunks], d, p.codec)
        chunks = []
        for frame, raw in codec.compress_chunks(plane, len(p.chunks), 1, None, exp_codec):
            chunks.append((pos, len(frame), raw, 0))
            blobs.append(frame)
            pos += len(frame)
        pieces.append(replace(p, chunks=tuple(chunks), codec=exp_codec))
    return replace(lay, pieces=tuple(pieces)), np.frombuffer(b"".join(blobs), np.uint8)


def median_rate(fn, arg, n, repeat) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t0)
    return n / statistics.median(ts) / 1e9


def run(a, bufs, n) -> float:
    """Print one codec's timings; returns decode + Numba merge G weights/s on one thread."""
    def fused(items):
        d = zstd.ZstdDecompressor()
        for lay, sm, exp in items:
            L.decode_expert(a.model, lay, sm, exp, d)

    def numpy_ref(items):
        d = zstd.ZstdDecompressor()
        for lay, sm, exp in items:
            for p in lay.pieces:
                e = codec.decompress_chunks([exp[o:o + s] for o, s, _, _ in p.chunks],
                                            [raw for _, _, raw, _ in p.chunks], d, p.codec)
                codec.merge_planes(e, sm[p.sm[0]:p.sm[0] + p.sm[1]], p.dtype)

    def decode_only(items):
        d = zstd.ZstdDecompressor()
        out = np.empty(max(c[2] for lay, _, _ in items for p in lay.pieces for c in p.chunks),
                       np.uint8)
        for lay, sm, exp in items:
            for p in lay.pieces:
                for o, s, raw, _ in p.chunks:
                    codec.decompress_chunk(exp[o:o + s], raw, p.codec, d, out[:raw])

    fused(bufs)  # JIT warm-up
    decode_only(bufs)
    one = 0.0
    for name, fn in (("exponent decode only", decode_only), ("decode + Numba merge", fused),
                     ("decode + numpy merge (reference)", numpy_ref)):
        rate = median_rate(fn, bufs, n, a.repeat)
        one = rate if fn is fused else one
        print(f"  1 thread  {name:<34} {rate:6.2f} G weights/s")
    for th in a.threads:
        if th < 2:
            continue
        with ThreadPoolExecutor(th) as pool:
            rate = th * median_rate(lambda b: list(pool.map(fused, [b] * th)), bufs, n,
                                    max(3, a.repeat // 3))
        print(f"  {th} threads decode + Numba merge: {rate:6.2f} G weights/s total, "
              f"{rate / th:.2f} per thread")
    return one


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args(argv)
    if a.model is None:
        from zipmoe_rt.default_model import ensure_default_model
        a.model = ensure_default_model()
    r = zmoe.ZmoeReader(a.model)
    lays = [lay for lay in L.expert_layouts(r).values() if not all(p.raw for p in lay.pieces)]
    if not lays:
        sys.exit(f"{a.model}: experts are stored raw; give a bit-plane model")
    lays = lays[: a.experts]
    src = [(lay, np.array(r.view(*lay.sm_region)), np.array(r.view(*lay.exp_region))) for lay in lays]
    n = sum(lay.elements for lay in lays)
    print(f"{a.model.name}: {len(lays)} experts, {n / 1e6:.1f} M weights, "
          f"{max(len(p.chunks) for p in lays[0].pieces)} exponent chunks per tensor")
    results = {}
    for exp_codec in zmoe.EXP_CODECS:
        bufs = []
        for lay, sm, exp in src:
            lay2, exp2 = recode(lay, exp, exp_codec)
            bufs.append((lay2, sm, exp2))
        bits = 8 * sum(sum(p.sm[1] + sum(c[1] for c in p.chunks) for p in lay.pieces)
                       for lay, _, _ in bufs) / n
        print(f"{exp_codec}: {bits:.2f} bits/weight ({100 * bits / 16:.1f} % of BF16)")
        results[exp_codec] = run(a, bufs, n)
    print(f"huffman / zstd, decode + Numba merge, 1 thread: "
          f"{results['huffman'] / results['zstd']:.2f}x")


if __name__ == "__main__":
    main()
