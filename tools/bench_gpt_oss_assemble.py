"""Time to turn one gpt-oss expert's in x out checkpoint slices into the [out, in] weights the
expert kernels read (:func:`zipmoe_rt.models.weights.assemble_expert`, tiled copies), against
the plain strided copies (``np.ascontiguousarray(gu[:, 0::2].T)`` ...) measured in the same run.

Usage: PYTHONPATH=.:format python tools/bench_gpt_oss_assemble.py [--hidden 2880]
[--intermediate 2880] [--reps 5]   (defaults: gpt-oss-20b / 120b's expert shape)
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from zipmoe_rt.models.weights import assemble_expert


def best(f, reps: int) -> float:
    """Fastest of ``reps`` calls after one warm-up, in seconds."""
    f()
    out = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--intermediate", type=int, default=2880)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    H, I = a.hidden, a.intermediate
    rng = np.random.default_rng(0)
    roles = {"gate_up_cols": rng.integers(0, 1 << 16, (H, 2 * I), dtype=np.uint16),
             "gate_up_bias": rng.integers(0, 1 << 16, 2 * I, dtype=np.uint16),
             "down_cols": rng.integers(0, 1 << 16, (I, H), dtype=np.uint16),
             "down_bias": rng.integers(0, 1 << 16, H, dtype=np.uint16)}

    def strided():
        gu = roles["gate_up_cols"]
        return (np.ascontiguousarray(gu[:, 0::2].T), np.ascontiguousarray(gu[:, 1::2].T),
                np.ascontiguousarray(roles["down_cols"].T))

    w, ref = assemble_expert(roles), strided()
    assert all(np.array_equal(x, y) for x, y in zip((w.gate, w.up, w.down), ref))
    base, tiled = best(strided, a.reps), best(lambda: assemble_expert(roles), a.reps)
    n = H * 3 * I
    print(f"expert H={H} I={I} ({n / 1e6:.1f} M weights): strided copies {base * 1e3:.1f} ms "
          f"(baseline), assemble_expert {tiled * 1e3:.1f} ms: {base / tiled:.2f}x the baseline's "
          f"speed, {n / tiled / 1e6:.0f} M weights/s")


if __name__ == "__main__":
    main()
