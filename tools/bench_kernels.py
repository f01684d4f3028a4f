#!/usr/bin/env python
"""Micro-benchmark of the BF16 kernels in :mod:`zipmoe_rt.kernels.linear`.

For each matrix shape, times (median of N runs) the BF16 GEMV ``linear(x, W_bf16)`` (weights read
in place as uint16) and numpy's float32 ``W_f32 @ x`` on a pre-converted copy, in the same run,
and prints G weights/s and the ratio. Also times a T-token prefill GEMM and the fused SwiGLU
expert.

Usage::

    python tools/bench_kernels.py [--runs 50] [--threads 2] [--prefill 16]

The machine may be shared: medians are reported; rerun when the load average is low.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _median_time(fn, runs: int) -> float:
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
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    ap.add_argument("--prefill", type=int, default=16, help="T for the prefill GEMM case")
    ap.add_argument("--wait-policy", choices=("active", "passive"), default="active",
                    help="OpenMP idle workers spin (active, default here) or sleep (passive)")
    args = ap.parse_args(argv)

    from zipmoe_rt.kernels import set_wait_policy

    set_wait_policy(args.wait_policy)

    import numba

    from zipmoe_rt.kernels.linear import linear, linear_into, swiglu_expert, widen_bf16

    if args.threads:
        numba.set_num_threads(args.threads)
    linear(np.ones((1, 1024), np.float32), np.zeros((1024, 1024), np.uint16))  # start threads
    print(f"numba {numba.__version__}, threads {numba.get_num_threads()}, "
          f"layer {numba.threading_layer()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY')}, "
          f"load avg {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)

    def bf16(a):
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)

    print(f"{'case':<28}{'bf16 numba':>18}{'numpy fp32':>18}{'ratio':>8}")
    for out_f, in_f in ((1536, 576), (576, 1536), (49152, 576)):
        W = bf16(rng.standard_normal((out_f, in_f)))
        Wf = widen_bf16(W)  # numpy's pre-converted fp32 copy
        x = rng.standard_normal((1, in_f)).astype(np.float32)
        y = np.empty((1, out_f), np.float32)
        runs = args.runs if out_f < 10000 else max(5, args.runs // 5)
        t_ours = _median_time(lambda: linear_into(x, W, y), runs)
        t_np = _median_time(lambda: Wf @ x[0], runs)
        n = out_f * in_f
        print(f"{'gemv %dx%d' % (out_f, in_f):<28}{n / t_ours / 1e9:>11.2f} Gw/s{n / t_np / 1e9:>11.2f} Gw/s"
              f"{t_np / t_ours:>8.2f}")
        T = args.prefill
        xt = rng.standard_normal((T, in_f)).astype(np.float32)
        t_ours = _median_time(lambda: linear(xt, W), max(3, runs // 2))
        t_np = _median_time(lambda: xt @ Wf.T, max(3, runs // 2))
        print(f"{'gemm T=%d %dx%d' % (T, out_f, in_f):<28}{T * n / t_ours / 1e9:>9.2f} GFMA/s"
              f"{T * n / t_np / 1e9:>9.2f} GFMA/s{t_np / t_ours:>8.2f}")
    H, I = 576, 1536
    g, u, d = bf16(rng.standard_normal((I, H))), bf16(rng.standard_normal((I, H))), bf16(
        rng.standard_normal((H, I)))
    gf, uf, df = widen_bf16(g), widen_bf16(u), widen_bf16(d)
    x = (0.1 * rng.standard_normal((1, H))).astype(np.float32)

    def np_expert():
        a = gf @ x[0]
        return df @ (a / (1 + np.exp(-a)) * (uf @ x[0]))

    t_ours = _median_time(lambda: swiglu_expert(x, g, u, d), args.runs)
    t_np = _median_time(np_expert, args.runs)
    n = 3 * H * I
    print(f"{'swiglu expert T=1 %dx%d' % (H, I):<28}{n / t_ours / 1e9:>11.2f} Gw/s{n / t_np / 1e9:>11.2f} Gw/s"
          f"{t_np / t_ours:>8.2f}")


if __name__ == "__main__":
    main()
