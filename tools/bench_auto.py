"""Policy ``auto`` against each single policy under memory budgets, in one process, alternating.

For each budget, loads the model once per policy (``raw-lru`` on the raw-expert companion
``NAME.raw.zmoe``, built as ``zipmoe-rt bench`` builds it; ``zip-lru``, ``zipmoe`` and
``auto`` on the model, with its trace and calibration), checks that every policy decodes the
same greedy tokens, then times greedy decoding, one policy after the other in a rotating order,
``--rounds`` times. Per policy: the median decode tokens/s and, per round, the ratio of
``auto`` to the fastest single policy of that round (median over rounds); beside them the
measured one-token MoE layer time and the planner's predictions (the plan's, and the delay
model priced at the hits the run had; ``zipmoe_rt/bench_planner.py``).

    python tools/bench_auto.py MODEL.zmoe -m 25% -m 50% [--tokens 32] [--rounds 7] [--json out.json]
    python tools/bench_auto.py MODEL.zmoe -m 10% --policy zip-lru --policy auto --prefetch both

``--policy`` (repeatable) picks the policies (default all four; ``auto ÷ best`` needs ``auto``
and another); ``--prefetch both`` loads each policy twice, with cross-layer prefetch off and
on (``POLICY+pf``), so that prefetch's effect on tg is measured in the same alternation, with
its recall per MoE layer, experts predicted per expert used and wasted bytes per token.

Alternating rounds in one process make the ratios robust to a load that changes over minutes
on a shared machine (each of ``zipmoe-rt bench``'s rows runs minutes apart in its own
process); memory per row is ``zipmoe-rt bench``'s to measure.
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
from zipmoe_rt import bench_planner  # noqa: E402
from zipmoe_rt.bench import prefetch_summary, prompt_ids, raw_companion  # noqa: E402
from zipmoe_rt.api import parse_size  # noqa: E402
from zipmoe_rt.engine.store import ZmoeSource  # noqa: E402

POLICIES = ("raw-lru", "zip-lru", "zipmoe", "auto")


def decode(m, ids, n):
    """Greedy decode of ``n`` tokens after prefilling ``ids``: (tokens, tokens/s, engine stats
    of the decode steps)."""
    net, eng = m.net, m.engine
    cache = net.new_cache()
    out = net.forward(np.array(ids, np.int64), cache)
    eng.stats.reset()
    toks = []
    t0 = time.perf_counter()
    for _ in range(n):
        t = int(np.argmax(out[-1]))
        toks.append(t)
        out = net.forward(np.array([t], np.int64), cache)
    dt = time.perf_counter() - t0
    return toks, n / dt, eng.stats.as_dict()


def _delay(m, model, workers):
    """The delay model a policy's engine planned with (zipmoe, auto), else the calibration's
    in the form the engine holds experts (zip-lru)."""
    import dataclasses
    from zipmoe_rt.engine import profile as prof
    from zipmoe_rt.engine.ctier import compute_form_delay
    eng = m.engine
    if getattr(eng, "delay", None) is not None:
        return eng.delay
    calib = prof.load_calibration(prof.sidecar(model, prof.CALIB_SUFFIX))
    src = eng.source
    lays = list(src.layouts.values())
    d = dataclasses.replace(prof.delay_model(calib, workers or os.cpu_count() or 1),
                            bytes_F=max(l.full_bytes for l in lays),
                            bytes_sm=max(l.sm_region[1] for l in lays),
                            bytes_exp=max(l.exp_region[1] for l in lays))
    return compute_form_delay(d, src, calib, eng.resident, eng.c_form)[0]


def run_budget(model, raw, budget, tokens, rounds, workers, log, policies=POLICIES,
               prefetch="off"):
    """One budget: every policy loaded (with ``prefetch`` ``both``: twice, prefetch off and
    on, the second named ``POLICY+pf``), checked and timed in rotating order."""
    src = ZmoeSource(model)
    nbytes = parse_size(budget, src)
    src.close()
    variants = [(p, pf) for p in policies
                for pf in ((False, True) if prefetch == "both" else (prefetch == "on",))]
    names = tuple(p + ("+pf" if pf and prefetch == "both" else "") for p, pf in variants)
    models = {name: load(raw if p == "raw-lru" else model, memory_budget=nbytes, policy=p,
                         workers=workers, progress=False, prefetch="on" if pf else "off")
              for name, (p, pf) in zip(names, variants)}
    try:
        ids = prompt_ids(next(iter(models.values())).tokenizer, 16)
        ref = None
        for p, m in models.items():      # warm-up (JIT, pools) and the same tokens everywhere
            toks, _, _ = decode(m, ids, tokens)
            if ref is None:
                ref = toks
            elif toks != ref:
                raise SystemExit(f"policy {p} decoded other tokens than raw-lru: {toks} != {ref}")
        tps = {p: [] for p in names}
        layer = {p: [] for p in names}
        hits = {p: [] for p in names}
        terms = {p: [] for p in names}
        delays = {p: _delay(models[p], model, workers) for p in names
                  if not p.startswith("raw-lru")}
        k = int(next(iter(models.values())).hparams["num_experts_per_tok"])
        stats = {p: [] for p in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for p in order:
                _, t, st = decode(models[p], ids, tokens)
                tps[p].append(t)
                layer[p].append(1e3 * st["decode_layer_s"] / max(1, st["decode_layer_calls"]))
                hits[p].append(st["call_hits"])
                stats[p].append(st)
                if p in delays:
                    terms[p].append(bench_planner.term_breakdown(st, delays[p], k))
            log(f"  round {r + 1}: " + ", ".join(f"{p} {tps[p][-1]:.2f}" for p in names))
        single = [p for p in names if p != "auto" and not p.endswith("+pf")]
        out = {"budget": budget, "budget_bytes": nbytes, "tokens": tokens, "rounds": rounds,
               "tg_tps": tps, "measured_layer_ms": layer, "policies": {}}
        for p in names:
            eng = models[p].engine
            row = {"tg_tps_median": statistics.median(tps[p]),
                   "measured_layer_ms_median": statistics.median(layer[p])}
            if "auto" in tps:
                row["auto_per_round_ratio_median"] = statistics.median(
                    a / b for a, b in zip(tps["auto"], tps[p]))
            if p + "+pf" in tps:     # prefetch on ÷ off, median of the rounds' ratios
                row["prefetch_on_off_median"] = statistics.median(
                    a / b for a, b in zip(tps[p + "+pf"], tps[p]))
            pf = prefetch_summary(stats[p], tokens * rounds)
            if pf.get("prefetch") == "on":
                row["prefetch"] = pf
            if not p.startswith("raw-lru"):
                row["modelled_layer_ms"] = bench_planner.modelled_layer_ms(
                    hits[p], model, workers, delay=delays.get(p))
            if terms[p]:     # per term, the median over rounds of measured and modelled
                row["terms_ms"] = {t: [statistics.median(r[t][i] for r in terms[p])
                                       for i in (0, 1)] for t in terms[p][0]}
            if eng.predicted_layer_s() is not None:
                row["predicted_layer_ms"] = 1e3 * eng.predicted_layer_s()
            if getattr(eng, "auto_choice", None) is not None:
                row["auto_choice"] = eng.auto_choice
            out["policies"][p] = row
        if "auto" in tps and single:
            out["auto_vs_best_median"] = statistics.median(
                tps["auto"][i] / max(tps[p][i] for p in single) for i in range(rounds))
            # the ratio of medians: the per-round ratio to the fastest of several policies is
            # below 1 even when all run alike (the max of noisy figures is biased upwards)
            out["auto_median_vs_best_median"] = statistics.median(tps["auto"]) / max(
                statistics.median(tps[p]) for p in single)
        return out
    finally:
        for m in models.values():
            m.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("-m", "--memory-budget", dest="budgets", action="append", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--raw-model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--policy", dest="policies", action="append", choices=POLICIES)
    ap.add_argument("--prefetch", choices=("off", "on", "both"), default="off")
    a = ap.parse_args(argv)
    policies = tuple(a.policies or POLICIES)
    raw = a.raw_model or raw_companion(a.model) if "raw-lru" in policies else None
    res = {"model": str(a.model), "machine": platform.node(), "cpus": os.cpu_count(),
           "workers": a.workers or os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "budgets": []}
    for b in a.budgets:
        print(f"budget {b}:", file=sys.stderr)
        res["budgets"].append(run_budget(a.model, raw, b, a.tokens, a.rounds, a.workers,
                                         lambda s: print(s, file=sys.stderr), policies,
                                         a.prefetch))
    print("| budget | policy | tg tokens/s (median) | auto ÷ policy (median of rounds) | "
          "layer ms measured | predicted (÷) | modelled at its hits (÷) |")
    print("|---|---|---|---|---|---|---|")
    for r in res["budgets"]:
        for p, row in r["policies"].items():
            meas = row["measured_layer_ms_median"]
            pr = row.get("predicted_layer_ms")
            mo = row.get("modelled_layer_ms")
            ratio = row.get("auto_per_round_ratio_median")
            print(f"| {r['budget']} | {p} | {row['tg_tps_median']:.2f} | "
                  + (f"{ratio:.2f}" if ratio else "-") + f" | {meas:.3f} | "
                  + (f"{pr:.3f} ({meas / pr:.2f}x)" if pr else "-") + " | "
                  + (f"{mo:.3f} ({meas / mo:.2f}x)" if mo else "-") + " |")
    print("\nPer term, measured/modelled ms per one-token MoE call at the run's hits "
          "(medians over rounds; zipmoe_rt/bench_planner.py term_breakdown):")
    for r in res["budgets"]:
        for p, row in r["policies"].items():
            if "terms_ms" in row:
                print(f"  {r['budget']} {p}: " + bench_planner.breakdown_line(
                    {t: tuple(v) for t, v in row["terms_ms"].items()}))
    for r in res["budgets"]:
        for p, row in r["policies"].items():
            if "prefetch_on_off_median" in row:
                pf = r["policies"][p + "+pf"]["prefetch"]
                print(f"\n{r['budget']} {p}: prefetch on ÷ off {row['prefetch_on_off_median']:.2f} "
                      f"(median of the rounds' ratios); recall per MoE layer "
                      + " ".join(f"{100 * v:.0f}" for v in pf["prefetch_recall"].values())
                      + " %; predicted per used expert " + " ".join(
                          f"{v:.2f}" for v in pf.get("prefetch_predicted_per_used", {}).values())
                      + f"; {pf['wasted_bytes_per_token'] / 1e6:.2f} MB wasted per token")
    for r in res["budgets"]:
        if "auto" not in r["policies"] or "auto_vs_best_median" not in r:
            continue
        ac = r["policies"]["auto"].get("auto_choice") or {}
        print(f"\n{r['budget']}: auto ÷ the fastest single policy of each round, median "
              f"{r['auto_vs_best_median']:.2f}; auto's median ÷ the fastest policy's median "
              f"{r['auto_median_vs_best_median']:.2f}; auto ran {ac.get('engine', '?')}"
              + (f" ({ac['summary']}, per MoE layer {ac['codes']})" if "codes" in ac else ""))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
