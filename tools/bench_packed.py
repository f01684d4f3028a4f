#!/usr/bin/env python
"""Micro-benchmark of the compute form's kernels (:mod:`zipmoe_rt.kernels.packed`) against the
BF16 GEMV they must match, one thread, in nanoseconds per weight.

For one matrix shape it builds ``--matrices`` random BF16 matrices (normal weights, so about
0.04 % escapes, as on the default model; together larger than the caches) and their compute
forms, then times, alternating the three in every round:

* ``bf16``: the BF16 GEMV (``linear._gemv_bf16_serial``, the weights read once from memory);
* ``packed``: the packed GEMV (``packed._pk_gemv_serial``: rows decoded into an L1 scratch,
  then the same dot loop);
* ``decode``: the row decode alone (every row into the same 4-row scratch, no dot product).

It prints the median ns per weight of each and the median of the per-round ratios to ``bf16``
(the figure to compare on a shared machine), after checking that the two GEMVs agree bit for
bit.

    python tools/bench_packed.py [--shape 1536x576] [--matrices 64] [--rounds 15]

Run it with ``NUMBA_NUM_THREADS=1`` (set here when absent).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "format")]

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

from zipmoe_rt.engine.resident import pack_bf16  # noqa: E402
from zipmoe_rt.kernels import linear as lin  # noqa: E402
from zipmoe_rt.kernels import packed as pk  # noqa: E402


@njit(**lin.JIT_SERIAL)
def _decode_rows(nib, sm, b7, ep, ec, ev, scratch):
    """Every row decoded into the 4-row scratch, as the packed GEMV does, without the dot."""
    acc = 0
    for r in range(nib.shape[0]):
        pk._unpack_row(nib, sm, b7, ep, ec, ev, r, scratch[r & 3])
        acc += scratch[r & 3, 0]
    return acc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1536x576", help="OUTxIN of each matrix")
    ap.add_argument("--matrices", type=int, default=64, help="matrices cycled through")
    ap.add_argument("--rounds", type=int, default=15)
    a = ap.parse_args(argv)
    out, n = (int(v) for v in a.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    Ws = []
    for _ in range(a.matrices):
        f = (rng.standard_normal((out, n)) * 0.02).astype(np.float32)
        Ws.append((f.view(np.uint32) >> 16).astype(np.uint16))
    Ps = [pack_bf16(W) for W in Ws]
    x = rng.standard_normal(n).astype(np.float32)
    y1, y2 = np.empty(out, np.float32), np.empty(out, np.float32)
    nb = np.zeros(0, np.float32)
    scratch = np.empty((4, n), np.uint16)
    lin._gemv_bf16_serial(x, Ws[0], y1, nb)
    pk._pk_gemv_serial(x, *pk._args(Ps[0]), y2)
    if not np.array_equal(y1, y2):
        print("packed GEMV differs from the BF16 GEMV")
        return 1
    cases = {
        "bf16": lambda i: lin._gemv_bf16_serial(x, Ws[i], y1, nb),
        "packed": lambda i: pk._pk_gemv_serial(x, *pk._args(Ps[i]), y2),
        "decode": lambda i: _decode_rows(*pk._args(Ps[i]), scratch),
    }
    for fn in cases.values():
        fn(0)
    ns = {k: [] for k in cases}
    for _ in range(a.rounds):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            for i in range(a.matrices):
                fn(i)
            ns[k].append((time.perf_counter() - t0) / (a.matrices * out * n) * 1e9)
    esc = sum(P.n_escapes for P in Ps) / (a.matrices * out * n)
    bits = 8 * sum(P.nbytes for P in Ps) / (a.matrices * out * n)
    print(f"{a.matrices} matrices {out}x{n} ({a.matrices * out * n * 2 / 1e6:.0f} MB BF16), "
          f"compute form {bits:.2f} bits/weight, {100 * esc:.3f} % escapes; one thread "
          f"(NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}), {a.rounds} rounds")
    for k in cases:
        ratio = statistics.median(v / b for v, b in zip(ns[k], ns["bf16"]))
        print(f"  {k:7s} {statistics.median(ns[k]):.3f} ns/weight   x{ratio:.2f} of bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
