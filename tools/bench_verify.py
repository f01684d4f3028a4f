#!/usr/bin/env python
"""What the CRC-32 check of expert reads costs a budgeted decode: in one process, alternating.

    python tools/bench_verify.py MODEL.zmoe --memory-budget 402MB [--rounds 12] [--json out.json]

Loads MODEL under the budget (policy zipmoe, ``O_DIRECT`` reads), prefills a short prompt, then
decodes greedily in rounds of 8 tokens, alternating two modes: ``every`` forgets, before each
token, which regions the engine has already checked (so every region read is CRC-checked, as
when each read was checked), and ``once`` (the engine's behaviour: a region is checked the first
time it is read). Prints per mode the median ms per token and CRC ms per token, and the median of
the per-round ratios ``every / once``; the modes alternate within one process so that a load
that changes over minutes on a shared machine affects both alike. The logits are the same in
both modes (a check reads, it changes nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]),
                str(Path(__file__).resolve().parents[1] / "format")]

from zipmoe_rt import load  # noqa: E402

PROMPT = "The history of the printing press begins"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--memory-budget", required=True)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    m = load(a.model, memory_budget=a.memory_budget, policy="zipmoe", direct=True, progress=False)
    net, eng = m.net, m.engine
    ids = np.array(m.tokenizer.encode(PROMPT), np.int64)
    res = {"every": [], "once": []}
    crc = {"every": [], "once": []}
    for rnd in range(a.rounds):
        if rnd % 4 == 0:                       # a fresh context every 4 rounds (not timed)
            cache = net.new_cache()
            tok = int(np.argmax(net.forward(ids, cache)[-1]))
        for mode in (("every", "once") if rnd % 2 == 0 else ("once", "every")):
            eng.stats.reset()
            t0 = time.perf_counter()
            for _ in range(8):
                if mode == "every":
                    eng.reverify()
                tok = int(np.argmax(net.forward(np.array([tok], np.int64), cache)[-1]))
            res[mode].append((time.perf_counter() - t0) / 8)
            crc[mode].append(eng.stats.verify_s / 8)
    out = {mode: {"ms_per_token": statistics.median(res[mode]) * 1e3,
                  "crc_ms_per_token": statistics.median(crc[mode]) * 1e3,
                  "rounds_ms": [x * 1e3 for x in res[mode]]} for mode in res}
    rat = [x / y for x, y in zip(res["every"], res["once"])]
    out["every_over_once"] = {"median": statistics.median(rat), "rounds": rat}
    out["budget"] = a.memory_budget
    out["load"] = os.getloadavg()
    m.close()
    for mode in ("every", "once"):
        print(f"{mode}: {out[mode]['ms_per_token']:.1f} ms/token, CRC "
              f"{out[mode]['crc_ms_per_token']:.1f} ms/token (medians over rounds)")
    print(f"every / once per round: {', '.join(f'{r:.2f}' for r in rat)}; median "
          f"{out['every_over_once']['median']:.2f}; load {out['load'][0]:.1f}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
