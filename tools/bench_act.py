#!/usr/bin/env python
"""The experts of one MoE layer with each gate activation of the CPU backend
(:data:`zipmoe_rt.backends.base.ACTIVATIONS`): SiLU runs the fused SwiGLU kernels, GELU-tanh
(Gemma 4) the parallel linear kernels and a NumPy activation. Times (median of ``--runs``)
``experts_token`` (one token, k experts: decode) and ``expert_accumulate`` over ``--prefill``
tokens per expert (prefill), in the same run, and prints each activation's time and its ratio to
SiLU's.

Usage::

    python tools/bench_act.py [--hidden 2816] [--inter 704] [--k 8] [--runs 30] [--prefill 16]

Default shape: Gemma 4 26B-A4B's experts (hidden 2816, expert width 704, top-8). The machine may
be shared: medians are reported; rerun when the load average is low.
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

from zipmoe_rt.backends import get_backend  # noqa: E402
from zipmoe_rt.backends.base import ACTIVATIONS  # noqa: E402
from zipmoe_rt.models.weights import ExpertWeights  # noqa: E402


def _median(fn, runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2816)
    ap.add_argument("--inter", type=int, default=704)
    ap.add_argument("--k", type=int, default=8, help="experts per token")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--prefill", type=int, default=16, help="tokens routed to one expert")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)

    def bf16(*shape):
        w = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        return (w.view(np.uint32) >> 16).astype(np.uint16)

    H, I = a.hidden, a.inter
    experts = [ExpertWeights(bf16(I, H), bf16(I, H), bf16(H, I)) for _ in range(a.k)]
    w = np.full(a.k, 1.0 / a.k, np.float32)
    x1 = rng.standard_normal(H).astype(np.float32)
    xT = rng.standard_normal((a.prefill, H)).astype(np.float32)
    rows = np.arange(a.prefill, dtype=np.int64)
    wT = np.full(a.prefill, 0.5, np.float32)
    be = get_backend("numba")
    res = {}
    for act in ACTIVATIONS:
        out1, outT = np.zeros(H, np.float32), np.zeros((a.prefill, H), np.float32)
        dec = _median(lambda: be.experts_token(out1, x1, experts, w, act=act), a.runs)
        pre = _median(lambda: be.expert_accumulate(outT, xT, rows, wT, experts[0], act=act),
                      a.runs)
        res[act] = (dec, pre)
    base = res["silu"]
    print(f"experts of hidden {H}, width {I}; decode: {a.k} experts of one token; prefill: one "
          f"expert over {a.prefill} tokens (median of {a.runs})")
    for act, (dec, pre) in res.items():
        print(f"{act:>18}: decode {dec * 1e3:8.3f} ms ({dec / base[0]:.2f}x silu), "
              f"prefill {pre * 1e3:8.3f} ms ({pre / base[1]:.2f}x silu)")


if __name__ == "__main__":
    main()
