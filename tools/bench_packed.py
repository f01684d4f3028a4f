#!/usr/bin/env python
"""Micro-benchmark of the compute form's kernels (:mod:`zipmoe_rt.kernels.packed`) against the
BF16 GEMV they must match, one thread, in nanoseconds per weight.

For one matrix shape it builds ``--matrices`` random BF16 matrices (normal weights, so about
0.04 % escapes, as on the default model; together larger than the caches) and their compute
forms, then times, alternating the four in every round:

* ``bf16``: the BF16 GEMV (``linear.gemv_bf16_serial`` on a uint16 matrix: rows read in
  place, the weights read once from memory);
* ``packed``: the same kernel on the compute form (``linear.gemv_bf16_serial`` on
  ``packed_source(P)``: each row decoded into an L1 scratch, then the same dot loop);
* ``decode``: the row decode alone (every row into the same 4-row scratch, no dot product);
* ``plain``: a BF16 GEMV written out without row sources (the kernel before the row-source
  template, kept here as the yardstick of what the template costs the BF16 path);
* ``packed0`` / ``decode0``: the packed GEMV and the row decode with the other form of the row
  decode (:mod:`zipmoe_rt.kernels.rows` has two, the same bits: the masked form, compiled in
  with AVX-512BW, and the shifted form, compiled in on AVX2 alone, ``rows.WIDE_VECTORS``); the
  tool prints which form is which and the median of the per-round ratios packed / packed0 and
  decode / decode0.

It prints the median ns per weight of each (the calling thread's CPU time, which on a
shared machine leaves out the time the thread waits for a core; wall-clock time beside it) and
the median of the per-round ratios to ``bf16`` (the figure to compare), after checking that
the three GEMVs agree bit for bit.

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
from zipmoe_rt.kernels.widen import bf16_to_f32  # noqa: E402
from zipmoe_rt.kernels import packed as pk  # noqa: E402
from zipmoe_rt.kernels import rows  # noqa: E402
from zipmoe_rt.kernels.rows import packed_source, unpack_row  # noqa: E402


@njit(**lin.JIT_SERIAL)
def _decode_rows(nib, sm, b7, ep, ec, ev, scratch):
    """Every row decoded into the 4-row scratch, as the packed GEMV does, without the dot."""
    acc = 0
    for r in range(nib.shape[0]):
        unpack_row(nib, sm, b7, ep, ec, ev, r, scratch[r & 3])
        acc += scratch[r & 3, 0]
    return acc


U16 = np.uint16


#: the row decode form the runtime's kernels do not use (the yardstick)
_unpack_row0 = rows.unpack_row_shifted if rows.WIDE_VECTORS else rows.unpack_row_masked


@njit(**lin.JIT_SERIAL)
def _decode_rows0(nib, sm, b7, ep, ec, ev, scratch):
    """:func:`_decode_rows` with the other row decode form."""
    acc = 0
    for r in range(nib.shape[0]):
        _unpack_row0(nib, sm, b7, ep, ec, ev, r, scratch[r & 3])
        acc += scratch[r & 3, 0]
    return acc


@njit(**lin.JIT_SERIAL)
def _packed0_gemv(x, nib, sm, b7, ep, ec, ev, y, s):
    """The packed GEMV's four-row steps (``linear._gemv_block``'s rows and dot loop) with the
    other row decode form."""
    out = y.shape[0]
    q = out // 4
    for b in range(q):
        _unpack_row0(nib, sm, b7, ep, ec, ev, b, s[0])
        _unpack_row0(nib, sm, b7, ep, ec, ev, b + q, s[1])
        _unpack_row0(nib, sm, b7, ep, ec, ev, b + 2 * q, s[2])
        _unpack_row0(nib, sm, b7, ep, ec, ev, b + 3 * q, s[3])
        a0, a1, a2, a3 = lin.dot4_bf16(x, s[0], s[1], s[2], s[3])
        y[b] = a0
        y[b + q] = a1
        y[b + 2 * q] = a2
        y[b + 3 * q] = a3
    for o in range(q * 4, out):
        _unpack_row0(nib, sm, b7, ep, ec, ev, o, s[0])
        y[o] = lin.dot1_bf16(x, s[0])


@njit(**lin.JIT_SERIAL)
def _plain_gemv(x, W, y):
    """The four-row BF16 GEMV without a row source (same blocks, same loop)."""
    out, n = W.shape
    q = out // 4
    for b in range(q):
        r0, r1, r2, r3 = W[b], W[b + q], W[b + 2 * q], W[b + 3 * q]
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for j in range(n):
            xj = x[j]
            a0 += bf16_to_f32(r0[j]) * xj
            a1 += bf16_to_f32(r1[j]) * xj
            a2 += bf16_to_f32(r2[j]) * xj
            a3 += bf16_to_f32(r3[j]) * xj
        y[b] = a0
        y[b + q] = a1
        y[b + 2 * q] = a2
        y[b + 3 * q] = a3
    for o in range(q * 4, out):
        acc = np.float32(0.0)
        for j in range(n):
            acc += bf16_to_f32(W[o, j]) * x[j]
        y[o] = acc


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
    y1, y2, y3, y4 = (np.empty(out, np.float32) for _ in range(4))
    nb = np.zeros(0, np.float32)
    scratch = np.empty((4, n), np.uint16)
    srcs = [packed_source(P) for P in Ps]
    lin.gemv_bf16_serial(x, Ws[0], y1, nb)
    lin.gemv_bf16_serial(x, srcs[0], y2, nb)
    _plain_gemv(x, Ws[0], y3)
    _packed0_gemv(x, *srcs[0], y4, scratch)
    if not (np.array_equal(y1, y2) and np.array_equal(y1, y3) and np.array_equal(y1, y4)):
        print("the GEMVs differ: BF16 / packed / plain / packed0")
        return 1
    cases = {
        "bf16": lambda i: lin.gemv_bf16_serial(x, Ws[i], y1, nb),
        "packed": lambda i: lin.gemv_bf16_serial(x, srcs[i], y2, nb),
        "decode": lambda i: _decode_rows(*srcs[i], scratch),
        "plain": lambda i: _plain_gemv(x, Ws[i], y3),
        "packed0": lambda i: _packed0_gemv(x, *srcs[i], y4, scratch),
        "decode0": lambda i: _decode_rows0(*srcs[i], scratch),
    }
    for fn in cases.values():
        fn(0)
    ns = {k: [] for k in cases}
    wall = {k: [] for k in cases}
    w = a.matrices * out * n
    for _ in range(a.rounds):
        for k, fn in cases.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            for i in range(a.matrices):
                fn(i)
            ns[k].append((time.thread_time() - c0) / w * 1e9)
            wall[k].append((time.perf_counter() - t0) / w * 1e9)
    esc = sum(P.n_escapes for P in Ps) / (a.matrices * out * n)
    bits = 8 * sum(P.nbytes for P in Ps) / (a.matrices * out * n)
    print(f"{a.matrices} matrices {out}x{n} ({a.matrices * out * n * 2 / 1e6:.0f} MB BF16), "
          f"compute form {bits:.2f} bits/weight, {100 * esc:.3f} % escapes; one thread "
          f"(NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}), {a.rounds} rounds")
    print("  ns per weight of this thread's CPU time (wall-clock time in brackets; on a loaded "
          "machine it includes time spent waiting for a core)")
    for k in cases:
        ratio = statistics.median(v / b for v, b in zip(ns[k], ns["bf16"]))
        print(f"  {k:7s} {statistics.median(ns[k]):.3f} ns/weight   x{ratio:.2f} of bf16   "
              f"[{statistics.median(wall[k]):.3f}]")
    forms = ("masked", "shifted") if rows.WIDE_VECTORS else ("shifted", "masked")
    print(f"  row decode: packed/decode the {forms[0]} form (compiled in: AVX-512BW "
          f"{rows.WIDE_VECTORS}), packed0/decode0 the {forms[1]} form")
    for new, old in (("packed", "packed0"), ("decode", "decode0")):
        r = statistics.median(v / b for v, b in zip(ns[new], ns[old]))
        print(f"  {new} / {old}: x{r:.3f} (median of the per-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
