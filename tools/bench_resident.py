"""``--resident compressed`` against the BF16 in-memory path, in one process.

Loads a model twice, ``resident="full"`` (every expert decoded to BF16) and
``resident="compressed"`` (every expert in the compute form, design note §6.5), both with
every expert loaded before timing. Checks that the two give bit-identical logits (a prefill
and each of the greedy steps) and the same greedy tokens, then times greedy decoding,
alternating the two models ``--rounds`` times, and prints the medians and their ratio with
the resident expert bytes of each, and the process CPU time per token (which, on a shared
machine, leaves out the time spent waiting for a core).

    python tools/bench_resident.py [MODEL.zmoe] [--tokens 64] [--rounds 7] [--json out.json]

MODEL defaults to the bundled default model. Ratios of one run are the figures to compare on
a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "format")]

from zipmoe_rt import load  # noqa: E402
from zipmoe_rt.bench import prompt_ids  # noqa: E402


def greedy(net, ids, steps):
    """Prefill logits and ``steps`` greedy tokens with each step's logits."""
    cache = net.new_cache()
    logits = [net.forward(np.array(ids, np.int64), cache)]
    toks = []
    for _ in range(steps):
        t = int(np.argmax(logits[-1][-1]))
        toks.append(t)
        logits.append(net.forward(np.array([t], np.int64), cache))
    return logits, toks


def decode_tps(net, ids, n):
    """Greedy decode of ``n`` tokens: (tokens/s of wall-clock time, process CPU ms per token).
    CPU time (all threads) leaves out the time spent waiting for a core on a shared machine."""
    cache = net.new_cache()
    out = net.forward(np.array(ids, np.int64), cache)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        out = net.forward(np.array([int(np.argmax(out[-1]))], np.int64), cache)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) * 1e3 / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per timed run")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timed runs per mode")
    ap.add_argument("--steps", type=int, default=20, help="greedy steps of the identity check")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    models = {}
    for mode in ("full", "compressed"):
        t0 = time.perf_counter()
        m = load(a.model, resident=mode, progress=False)
        m.source.admit_all()
        models[mode] = (m, time.perf_counter() - t0)
    full, comp = models["full"][0], models["compressed"][0]
    ids = prompt_ids(full.tokenizer, 32)
    lf, tf = greedy(full.net, ids, a.steps)
    lc, tc = greedy(comp.net, ids, a.steps)
    identical = all(np.array_equal(x, y) for x, y in zip(lf, lc)) and tf == tc
    maxd = max(float(np.abs(x - y).max()) for x, y in zip(lf, lc))
    tps = {"full": [], "compressed": []}
    cpu = {"full": [], "compressed": []}
    for mode in tps:    # warm-up
        decode_tps(models[mode][0].net, ids[:16], 4)
    for _ in range(a.rounds):
        for mode in tps:
            t, c = decode_tps(models[mode][0].net, ids[:16], a.tokens)
            tps[mode].append(t)
            cpu[mode].append(c)
    med = {k: statistics.median(v) for k, v in tps.items()}
    ratios = [c / f for f, c in zip(tps["full"], tps["compressed"])]
    cpu_ratios = [c / f for f, c in zip(cpu["full"], cpu["compressed"])]
    bytes_ = {k: models[k][0].source.expert_bytes() for k in models}
    res = {"model": str(full.path), "identical_logits_and_tokens": identical,
           "max_abs_dlogit": maxd, "greedy_tokens": tf, "tokens": a.tokens, "rounds": a.rounds,
           "tps": tps, "median_tps": med, "ratio_of_medians": med["compressed"] / med["full"],
           "median_ratio": statistics.median(ratios),
           "cpu_ms_per_token": cpu,
           "median_cpu_ms_per_token": {k: statistics.median(v) for k, v in cpu.items()},
           "median_cpu_ratio": statistics.median(cpu_ratios),
           "expert_bytes_full": bytes_["full"]["held"],
           "expert_bytes_compressed": bytes_["compressed"]["held"],
           "expert_bytes_ratio": bytes_["compressed"]["held"] / bytes_["full"]["held"],
           "load_s": {k: models[k][1] for k in models},
           "cpus": os.cpu_count(), "machine": platform.node(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"bit-identical logits ({a.steps} greedy steps) and tokens: {identical} "
          f"(max |dlogit| {maxd:g})")
    print(f"expert bytes: full {res['expert_bytes_full'] / 1e6:.1f} MB, compressed "
          f"{res['expert_bytes_compressed'] / 1e6:.1f} MB ({100 * res['expert_bytes_ratio']:.1f} %)")
    print(f"decode tg{a.tokens} tokens/s, median of {a.rounds} alternating runs: full "
          f"{med['full']:.1f}, compressed {med['compressed']:.1f}; ratio of medians "
          f"{res['ratio_of_medians']:.3f}, median of per-round ratios {res['median_ratio']:.3f}")
    print(f"process CPU ms per token (all threads), median: full "
          f"{res['median_cpu_ms_per_token']['full']:.1f}, compressed "
          f"{res['median_cpu_ms_per_token']['compressed']:.1f}; median of per-round ratios "
          f"(compressed / full) {res['median_cpu_ratio']:.3f}")
    print(f"load s: full {res['load_s']['full']:.1f}, compressed {res['load_s']['compressed']:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    for m, _ in models.values():
        m.close()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
