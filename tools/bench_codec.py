#!/usr/bin/env python
"""Decode + merge throughput of one expert on one core, and compression ratio (design note §1).

    python tools/bench_codec.py [MODEL.zmoe] [--repeat 30] [--threads 1 2]

Decodes every exponent chunk of a few experts with zstd and merges it with the sign+mantissa
plane in the Numba kernel (what a decode worker does), from buffers already in memory, and
prints G weights/s per core (median) beside the plain-numpy reference merge of the same data in
the same run. With several threads, each decodes its own experts concurrently (the workers).
Default model: the bundled one (built on first use).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    lays = list(L.expert_layouts(r).values())[: a.experts]
    bufs = [(lay, np.array(r.view(*lay.sm_region)), np.array(r.view(*lay.exp_region))) for lay in lays]
    n = sum(lay.elements for lay in lays)
    stored = sum(lay.sm_region[1] + lay.exp_region[1] for lay in lays)
    bits = 8 * sum(sum(p.sm[1] + sum(c[1] for c in p.chunks) for p in lay.pieces) for lay in lays) / n
    print(f"{a.model.name}: {len(lays)} experts, {n / 1e6:.1f} M weights, {bits:.2f} bits/weight "
          f"({100 * bits / 16:.1f} % of BF16), regions {stored / 1e6:.1f} MB")

    def fused(items):
        d = zstd.ZstdDecompressor()
        for lay, sm, exp in items:
            L.decode_expert(a.model, lay, sm, exp, d)

    def numpy_ref(items):
        d = zstd.ZstdDecompressor()
        for lay, sm, exp in items:
            for p in lay.pieces:
                e = codec.decompress_chunks([exp[o:o + s] for o, s, _, _ in p.chunks],
                                            [raw for _, _, raw, _ in p.chunks], d)
                codec.merge_planes(e, sm[p.sm[0]:p.sm[0] + p.sm[1]], p.dtype)

    def zstd_only(items):
        d = zstd.ZstdDecompressor()
        for lay, sm, exp in items:
            for p in lay.pieces:
                for o, s, raw, _ in p.chunks:
                    d.decompress(exp[o:o + s], max_output_size=raw)

    fused(bufs)  # JIT warm-up
    for name, fn in (("zstd decode only", zstd_only), ("decode + Numba merge", fused),
                     ("decode + numpy merge (reference)", numpy_ref)):
        ts = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn(bufs)
            ts.append(time.perf_counter() - t0)
        print(f"  1 thread  {name:<34} {n / statistics.median(ts) / 1e9:6.2f} G weights/s")
    for th in a.threads:
        if th < 2:
            continue
        ts = []
        with ThreadPoolExecutor(th) as pool:
            for _ in range(max(3, a.repeat // 3)):
                t0 = time.perf_counter()
                list(pool.map(fused, [bufs] * th))
                ts.append(time.perf_counter() - t0)
        rate = th * n / statistics.median(ts) / 1e9
        print(f"  {th} threads decode + Numba merge: {rate:6.2f} G weights/s total, "
              f"{rate / th:.2f} per thread")


if __name__ == "__main__":
    main()
