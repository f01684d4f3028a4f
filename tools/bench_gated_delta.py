#!/usr/bin/env python
"""Time of one Gated DeltaNet layer's ops (conv1d + SiLU, the gated delta rule, the gated
RMSNorm) at the shape of Qwen3-Next-80B-A3B / Qwen3.5-35B-A3B (16 key heads and 32 value heads of
128, conv kernel 4): decode (one token, the recurrence) and prefill (``--prompt`` tokens, the
chunked scan), on the Numba backend, with the NumPy reference backend measured in the same run
as the baseline (printed as a ratio).

    python tools/bench_gated_delta.py [--prompt 512] [--repeat 5] [--threads N]

Median of ``--repeat`` runs after a warm-up call (which also compiles the kernels).
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
    sys.path[:0] = [str(Path(__file__).resolve().parent.parent),
                    str(Path(__file__).resolve().parent.parent / "format")]

from zipmoe_rt.backends import get_backend  # noqa: E402

NK, NV, DK, DV, K = 16, 32, 128, 128, 4


def _inputs(T, rng):
    C = 2 * NK * DK + NV * DV
    return dict(x=rng.standard_normal((T, C)).astype(np.float32),
                ba=rng.standard_normal((T, 2 * NV)).astype(np.float32),
                z=rng.standard_normal((T * NV, DV)).astype(np.float32),
                w=(0.3 * rng.standard_normal((C, K))).astype(np.float32),
                A_log=np.log(rng.uniform(1, 16, NV)).astype(np.float32),
                dt=rng.standard_normal(NV).astype(np.float32),
                norm=(1 + 0.1 * rng.standard_normal(DV)).astype(np.float32),
                conv=np.zeros((K - 1, C), np.float32),
                state=(0.1 * rng.standard_normal((NV, DK, DV))).astype(np.float32))


def _layer(be, a):
    """The ops of one linear layer after its projections, on backend ``be``."""
    conv_next, state_next = np.empty_like(a["conv"]), np.empty_like(a["state"])
    y = be.conv1d_silu(a["x"], a["w"], a["conv"], conv_next)
    core = be.gated_delta_rule(y, a["ba"], a["A_log"], a["dt"], NK, NV, DK, DV, a["state"],
                               state_next)
    return be.rmsnorm_gated(core.reshape(-1, DV), a["norm"], a["z"], 1e-6)


def _time(be, a, repeat):
    _layer(be, a)
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        _layer(be, a)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all)")
    args = ap.parse_args(argv)
    if args.threads:
        import numba
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    fast, ref = get_backend("numba"), get_backend("numpy")
    print(f"one Gated DeltaNet layer ({NK} key / {NV} value heads of {DK}, kernel {K})")
    for label, T in (("decode, 1 token", 1), (f"prefill, {args.prompt} tokens", args.prompt)):
        a = _inputs(T, rng)
        tf, tr = _time(fast, a, args.repeat), _time(ref, a, max(1, args.repeat // 2))
        print(f"  {label:<24} numba {tf * 1e3:9.3f} ms ({T / tf:10,.0f} tokens/s)   "
              f"numpy reference {tr * 1e3:9.3f} ms   numba is {tr / tf:5.1f}x the reference")


if __name__ == "__main__":
    main()
