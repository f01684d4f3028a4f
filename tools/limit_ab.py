#!/usr/bin/env python
"""Configurations of ``zipmoe-rt bench`` under a memory cgroup, alternating, one process each.

    .venv/bin/python tools/limit_ab.py MODEL.zmoe --rounds 3 \\
        --row "off=--prefetch off" --row "on=--prefetch on" [--row "base@DIR=--prefetch off"]

Each round runs every ``--row`` once (the order reversed every other round), each as
``zipmoe-rt bench MODEL --memory-limit auto --policy zipmoe --direct -p 16 -n 32 -r 2 OPTIONS``
in a fresh cgroup v1 limited to ``--limit`` (default 600 MB, page cache dropped first;
``tools/llamacpp_cgroup.py``, as ``tools/compare_llamacpp.py`` runs its children). A row
``NAME@DIR=OPTIONS`` runs the runtime found in ``DIR`` (a checkout of another commit, for a
before/after in one sitting). Prints per row and round: decode tokens/s, MB read per token,
the engine's stage times per token (reads summed over the reads in flight, of which CRC-32
checks; decode-worker time; the main thread's wait for weights and expert matmuls; the
one-token MoE layer calls' wall time), hits per tier and the prefetch counters; then per row
the median over rounds and, against the first row, the median of the per-round ratios (the
machine's load changes over minutes; a ratio within one round is the robust figure).
``--json`` writes every row of every round. Needs root (cgroups, drop_caches).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_cgroup import drop_page_cache, run_in_cgroup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def parse_row(spec: str):
    """``NAME[@DIR]=OPTIONS`` -> (name, runtime folder, option list)."""
    head, sep, opts = spec.partition("=")
    if not sep or not head:
        raise SystemExit(f"--row {spec!r}: expected NAME=OPTIONS or NAME@DIR=OPTIONS")
    name, _, where = head.partition("@")
    return name, Path(where).resolve() if where else REPO, opts.split()


def one(model, name, where, opts, a):
    out = Path(a.work) / f"limit-ab-{name}.json"
    drop_page_cache([model])
    env = dict(os.environ, PYTHONPATH=f"{where}{os.pathsep}{where / 'format'}")
    cmd = [sys.executable, "-m", "zipmoe_rt.cli", "bench", str(model), "--memory-limit",
           "auto", "--policy", "zipmoe", "--direct", "-p", "16", "-n", str(a.tokens),
           "-r", "2", "--json", str(out)] + opts
    r = run_in_cgroup("limit-ab", cmd, a.limit, timeout=900, env=env, cwd=str(where))
    if r["returncode"] != 0:
        raise SystemExit(f"row {name} failed (exit {r['returncode']}):\n{r['stderr'][-3000:]}")
    row = json.loads(out.read_text())["rows"][0]
    runs = row["runs"]
    e, n = runs[-1]["engine"], runs[-1]["decode_steps"]
    per = {k: e.get(k, 0.0) / n * 1e3 for k in ("io_s", "verify_s", "decode_s", "wait_s",
                                                 "compute_s", "decode_layer_s")}
    return {"name": name, "tg": statistics.mean(u["decode_tps"] for u in runs),
            "tg_runs": [u["decode_tps"] for u in runs], "mb_per_token": e["bytes_read"] / n / 1e6,
            "ms_per_token": per, "hits": e["hits"], "budget": row["budget_bytes"],
            "prefetch": {"issued": e["prefetch_issued"] / n, "used": e["prefetch_used"] / n,
                         "wasted_mb": e["prefetch_wasted_bytes"] / n / 1e6},
            "cgroup_peak": r["max_usage"], "oom_killed": r["oom_killed"],
            "load": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--row", action="append", required=True, help="NAME[@DIR]=OPTIONS")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--limit", type=float, default=600e6, help="bytes (default 600e6)")
    ap.add_argument("--work", default="/tmp", help="folder for the rows' bench JSON")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    a.limit = int(a.limit)
    rows = [parse_row(s) for s in a.row]
    got = {name: [] for name, _, _ in rows}
    for rnd in range(a.rounds):
        for name, where, opts in (rows if rnd % 2 == 0 else rows[::-1]):
            x = one(a.model, name, where, opts, a)
            x["round"] = rnd
            got[name].append(x)
            m = x["ms_per_token"]
            print(f"round {rnd} {name:8s} tg {x['tg']:6.2f}  MB/tok {x['mb_per_token']:5.1f}  "
                  f"io {m['io_s']:6.1f} (crc {m['verify_s']:4.1f}) dec {m['decode_s']:5.1f} "
                  f"wait {m['wait_s']:5.1f} mm {m['compute_s']:5.1f} moe {m['decode_layer_s']:6.1f} "
                  f"ms/tok  hits {x['hits']}  prefetch {x['prefetch']['issued']:.1f} started "
                  f"{x['prefetch']['wasted_mb']:.1f} MB wasted/tok  load {x['load']:.1f}",
                  flush=True)
    first = rows[0][0]
    for name in got:
        tg = [x["tg"] for x in got[name]]
        line = f"{name}: tg median {statistics.median(tg):.2f}"
        if name != first:
            rat = [x["tg"] / y["tg"] for x, y in zip(got[name], got[first])]
            line += (f"; / {first} per round {', '.join(f'{r:.2f}' for r in rat)}, "
                     f"median {statistics.median(rat):.2f}")
        print(line)
    if a.json:
        a.json.write_text(json.dumps({"rows": got, "limit": a.limit, "model": str(a.model)},
                                     indent=1))


if __name__ == "__main__":
    main()
