"""``--resident compressed`` against the BF16 in-memory path, in one process.

Loads a model twice, ``resident="full"`` (every expert decoded to BF16) and
``resident="compressed"`` (every expert and the dense linears in the compute form, design note
§6.5), both with every expert loaded before timing; with ``--experts-only`` also a third
network on the compressed model's experts with its dense weights in BF16 (the compute form
for experts only). Checks that they give bit-identical logits (a prefill and each of the
greedy steps) and the same greedy tokens, then times greedy decoding, alternating the models
``--rounds`` times, and prints the medians and their ratios to BF16 with the resident expert
and dense bytes of each, and the process CPU time per token (which, on a shared machine,
leaves out the time spent waiting for a core).

    python tools/bench_resident.py [MODEL.zmoe] [--tokens 64] [--rounds 7] [--experts-only]
        [--json out.json]

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
from zipmoe_rt.models import build_model  # noqa: E402


class _DenseBF16:
    """A weight source as ``source``, but one a model holds the dense weights of in BF16."""

    resident = "full"

    def __init__(self, source):
        self._s = source

    def __getattr__(self, name):
        return getattr(self._s, name)


def _held(net) -> int:
    """Bytes of the dense weights ``net`` holds, from its arrays and packed matrices."""
    from zipmoe_rt.models.packed import PackedMatrix
    seen, todo, n = set(), [net], 0
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, (np.ndarray, PackedMatrix)):
            n += o.nbytes
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif type(o).__module__.startswith("zipmoe_rt.models") and hasattr(o, "__dict__"):
            todo.extend(v for k, v in vars(o).items()
                        if k not in ("source", "executor", "backend", "route_hook", "_s"))
    return n


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
    ap.add_argument("--experts-only", action="store_true",
                    help="also time the compute form for experts only (dense weights BF16)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    models = {}
    for mode in ("full", "compressed"):
        t0 = time.perf_counter()
        m = load(a.model, resident=mode, progress=False)
        m.source.admit_all()
        models[mode] = (m, time.perf_counter() - t0)
    full, comp = models["full"][0], models["compressed"][0]
    nets = {"full": full.net, "compressed": comp.net}
    if a.experts_only:
        nets["experts-only"] = build_model(_DenseBF16(comp.source), comp.net.executor)
    ids = prompt_ids(full.tokenizer, 32)
    lf, tf = greedy(full.net, ids, a.steps)
    identical, maxd = True, 0.0
    for mode, net in nets.items():
        if mode != "full":
            lc, tc = greedy(net, ids, a.steps)
            identical &= all(np.array_equal(x, y) for x, y in zip(lf, lc)) and tf == tc
            maxd = max([maxd] + [float(np.abs(x - y).max()) for x, y in zip(lf, lc)])
    tps = {k: [] for k in nets}
    cpu = {k: [] for k in nets}
    for mode in tps:    # warm-up
        decode_tps(nets[mode], ids[:16], 4)
    for _ in range(a.rounds):
        for mode in tps:
            t, c = decode_tps(nets[mode], ids[:16], a.tokens)
            tps[mode].append(t)
            cpu[mode].append(c)
    med = {k: statistics.median(v) for k, v in tps.items()}
    ratios = [c / f for f, c in zip(tps["full"], tps["compressed"])]
    cpu_ratios = [c / f for f, c in zip(cpu["full"], cpu["compressed"])]
    per_mode = {k: {"median_ratio": statistics.median([c / f for f, c in zip(tps["full"], v)]),
                    "median_cpu_ratio": statistics.median(
                        [c / f for f, c in zip(cpu["full"], cpu[k])]),
                    "dense_bytes": _held(nets[k])} for k, v in tps.items()}
    bytes_ = {k: models[k][0].source.expert_bytes() for k in models}
    res = {"model": str(full.path), "identical_logits_and_tokens": identical,
           "per_mode": per_mode, "load_average": os.getloadavg(),
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
    for k, v in per_mode.items():
        print(f"  {k:>12}: dense {v['dense_bytes'] / 1e6:.1f} MB, tg{a.tokens} median "
              f"{med[k]:.1f} tok/s, median per-round ratio to full {v['median_ratio']:.3f}, "
              f"CPU ratio {v['median_cpu_ratio']:.3f}")
    print(f"load s: full {res['load_s']['full']:.1f}, compressed {res['load_s']['compressed']:.1f}"
          f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    for m, _ in models.values():
        m.close()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
