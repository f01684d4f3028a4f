#!/usr/bin/env python
"""Micro-benchmark of the BF16 kernels in :mod:`zipmoe_rt.kernels.linear`.

For each matrix shape, times (median of N runs) the BF16 GEMV ``linear(x, W_bf16)`` (weights read
in place as uint16) and numpy's float32 ``W_f32 @ x`` on a pre-converted copy, in the same run,
and prints G weights/s and the ratio (numpy time / ours). Also a T-token prefill GEMM and the
fused SwiGLU expert. All Numba cases run first, then all numpy cases, so the two thread pools
(OpenMP for Numba, OpenBLAS for numpy, both spinning after work) do not disturb each other.

Usage::

    python tools/bench_kernels.py [--runs 50] [--threads 2] [--prefill 16] [--wait-policy active]

The machine may be shared: medians are reported; rerun when the load average is low.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _median_time(fn, runs: int) -> float:
    import numpy as np

    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="timed runs per case (median reported)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for Numba and numpy's BLAS (default: all cores)")
    ap.add_argument("--prefill", type=int, default=16, help="T for the prefill GEMM case")
    ap.add_argument("--wait-policy", choices=("active", "passive"), default="active",
                    help="OpenMP idle workers spin (active, default here) or sleep (passive)")
    args = ap.parse_args(argv)
    threads = args.threads or len(os.sched_getaffinity(0))
    if "numpy" not in sys.modules:  # BLAS reads these once, at import
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, str(threads))

    import numba
    import numpy as np

    from zipmoe_rt.kernels import set_wait_policy

    set_wait_policy(args.wait_policy)
    from zipmoe_rt.kernels.linear import linear, linear_into
    from zipmoe_rt.kernels.widen import widen_bf16
    from zipmoe_rt.kernels.swiglu import swiglu_expert

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    linear(np.ones((1, 1024), np.float32), np.zeros((1024, 1024), np.uint16))  # start threads
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
          f"layer {numba.threading_layer()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)

    def bf16(a):
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    cases = []  # (label, unit, work, ours, numpy, runs)
    T = args.prefill
    for out_f, in_f in ((1536, 576), (576, 1536), (49152, 576)):
        W = bf16(rng.standard_normal((out_f, in_f)))
        Wf = widen_bf16(W)  # numpy's pre-converted fp32 copy
        x = rng.standard_normal((1, in_f)).astype(np.float32)
        y = np.empty((1, out_f), np.float32)
        xt = rng.standard_normal((T, in_f)).astype(np.float32)
        runs = args.runs if out_f < 10000 else max(5, args.runs // 5)
        n = out_f * in_f
        cases.append((f"gemv {out_f}x{in_f}", "Gw/s", n,
                      lambda x=x, W=W, y=y: linear_into(x, W, y),
                      lambda x=x, Wf=Wf: Wf @ x[0], runs))
        cases.append((f"gemm T={T} {out_f}x{in_f}", "GFMA/s", T * n,
                      lambda xt=xt, W=W: linear(xt, W), lambda xt=xt, Wf=Wf: xt @ Wf.T,
                      max(3, runs // 2)))
    H, I = 576, 1536
    g, u, d = (bf16(rng.standard_normal(s)) for s in ((I, H), (I, H), (H, I)))
    gf, uf, df = widen_bf16(g), widen_bf16(u), widen_bf16(d)
    xe = (0.1 * rng.standard_normal((1, H))).astype(np.float32)

    def np_expert():
        a = gf @ xe[0]
        return df @ (a / (1 + np.exp(-a)) * (uf @ xe[0]))

    cases.append((f"swiglu expert T=1 {H}x{I}", "Gw/s", 3 * H * I,
                  lambda: swiglu_expert(xe, g, u, d), np_expert, args.runs))
    ours = [_median_time(c[3], c[5]) for c in cases]
    theirs = [_median_time(c[4], c[5]) for c in cases]
    print(f"{'case':<28}{'bf16 numba':>16}{'numpy fp32':>16}{'ratio':>8}")
    for (label, unit, work, *_), t1, t2 in zip(cases, ours, theirs):
        print(f"{label:<28}{work / t1 / 1e9:>9.2f} {unit:<6}{work / t2 / 1e9:>9.2f} {unit:<6}"
              f"{t2 / t1:>8.2f}")


if __name__ == "__main__":
    main()
