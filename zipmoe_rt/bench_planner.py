"""``zipmoe-rt bench``'s planner figures: the predicted MoE layer time beside the measured one,
and what policy ``auto`` chose per layer (design note §3.5, §3.8).

Two predictions per budgeted row with a calibration next to the model:

* ``predicted_layer_ms`` (rows whose engine has a tier plan: ``zipmoe``, ``auto``): the plan's
  expected one-token MoE layer time, the mean over layers of
  :attr:`~zipmoe_rt.engine.planner.TierPlan.predicted_makespan_s` (hits per tier as the
  planner expects them from the trace);
* ``modelled_layer_ms`` (compressed-expert rows): the delay model priced at the hits the run
  really had, call by call (the engine's ``call_hits``), so that the delay model is checked
  apart from the planner's hit model.
"""
from __future__ import annotations

import os

from .engine import profile as prof


def modelled_layer_ms(call_hits: list[dict], model_path, workers, delay=None) -> float | None:
    """Mean delay-model time (ms) of the one-token MoE calls of a row's runs.

    Args:
        call_hits: per run, the engine's ``call_hits`` (``"hF,hC,hS,hE,hmiss"`` -> calls).
        model_path: the ``.zmoe`` file (its ``MODEL.calib.json`` gives the delay model).
        workers: the row's decode workers (None: one per core).
        delay: the :class:`~zipmoe_rt.engine.planner.DelayModel` to price with (the one the
            engine planned with, which prices C hits in the form the C slots hold); None: the
            calibration's.

    Returns:
        milliseconds, or None without a calibration (and no ``delay``) or without one-token
        calls.
    """
    if delay is None:
        calib = prof.load_calibration(prof.sidecar(model_path, prof.CALIB_SUFFIX))
        if calib is None:
            return None
        delay = prof.delay_model(calib, workers or os.cpu_count() or 1)
    tot = n = 0
    for ch in call_hits:
        for key, calls in (ch or {}).items():
            h = dict(zip(("F", "C", "S", "E", "miss"), (int(v) for v in key.split(","))))
            tot += calls * delay.layer_makespan(h)
            n += calls
    return 1e3 * tot / n if n else None


#: the terms of :func:`term_breakdown`, in print order
TERMS = ("layer", "rest", "matmul", "wait", "reads", "decode")


def term_breakdown(stats: dict, delay, k: int) -> dict:
    """One-token MoE calls, measured against the delay model term by term (ms per call).

    ``stats`` are the engine's statistics (``StageTimes.as_dict``) of decode steps only (reset
    after the prefill); ``delay`` the :class:`~zipmoe_rt.engine.planner.DelayModel` the engine
    planned with (or one from the calibration). Each term is ``(measured, modelled)``:

    * ``layer``: the call's wall time against ``layer_makespan`` at the call's hits;
    * ``matmul``: the main thread in expert kernels (``compute_s``) against ``matmul_time(k)``
      plus the compute-form C hits' extra;
    * ``wait``: the main thread blocked on loads (``wait_s``) against ``max(io, compute)``, the
      base model's critical path of the loads (0 when every expert is resident);
    * ``rest``: the call less ``matmul`` and ``wait`` (Python, routing bookkeeping, hand-offs)
      against the engine terms (``layer_fixed_s + Σ load_t_s·h_t``);
    * ``reads``: seconds in region reads, summed over the reads in flight (``io_s``), against
      the priced reads (``sm_read_s·(hE + hmiss) + exp_read_s·(hS + hmiss)``, a throughput
      price: reads in flight overlap, so the measured sum may exceed it by up to the io depth);
    * ``decode``: decode-worker seconds (``decode_s``) against ``decode_s`` per decoded expert.

    Returns:
        ``{term: (measured_ms, modelled_ms)}`` over :data:`TERMS`, or ``{}`` without one-token
        calls.
    """
    calls = int(stats.get("decode_layer_calls") or 0)
    if not calls:
        return {}
    mod = dict.fromkeys(TERMS, 0.0)
    for key, n in (stats.get("call_hits") or {}).items():
        h = dict(zip(("F", "C", "S", "E", "miss"), (int(v) for v in key.split(","))))
        dC, xC = delay.c_hit_cost(h["C"])
        d = int(dC) + h["S"] + h["E"] + h["miss"]
        io, comp = delay.io_and_compute(d, h["E"] + h["miss"], h["S"] + h["miss"])
        kk = sum(h.values())
        eng = float(delay.engine_overhead_s(h["C"], h["S"], h["E"], h["miss"]))
        mod["layer"] += n * delay.layer_makespan(h)
        mod["matmul"] += n * (delay.matmul_time(kk) + float(xC))
        mod["wait"] += n * (float(max(io, comp)) if d else 0.0)
        mod["rest"] += n * eng
        mod["reads"] += n * (delay.sm_read_s * (h["E"] + h["miss"])
                             + delay.exp_read_s * (h["S"] + h["miss"]))
        mod["decode"] += n * delay.decode_s * d
    meas = {"layer": stats["decode_layer_s"], "matmul": stats["compute_s"],
            "wait": stats["wait_s"], "reads": stats["io_s"], "decode": stats["decode_s"]}
    meas["rest"] = meas["layer"] - meas["matmul"] - meas["wait"]
    return {t: (1e3 * meas[t] / calls, 1e3 * mod[t] / calls) for t in TERMS}


def breakdown_line(terms: dict) -> str:
    """:func:`term_breakdown` as one line: ``term measured/modelled ms (ratio)`` per term."""
    def one(t, m, p):
        r = f" ({m / p:.2f}x)" if p > 1e-9 else ""
        return f"{t} {m:.3f}/{p:.3f}{r}"
    return ", ".join(one(t, *terms[t]) for t in TERMS if t in terms)


def row_fields(row: dict, engines: list[dict], model_path, workers) -> dict:
    """The planner fields of one bench row from its runs' engine dicts: ``modelled_layer_ms``
    (policies other than ``raw-lru``; priced with the engine's own delay model where the
    engine dict carries it as ``delay``, the fields of the
    :class:`~zipmoe_rt.engine.planner.DelayModel` it planned with, else with the
    calibration's), ``predicted_layer_ms`` (engines with a plan) and ``auto_choice`` (policy
    ``auto``)."""
    from .engine.planner import DelayModel
    out = {}
    if row["policy"] != "raw-lru":
        d = engines[0].get("delay")
        m = modelled_layer_ms([e.get("call_hits") for e in engines], model_path, workers,
                              delay=DelayModel(**d) if d else None)
        if m is not None:
            out["modelled_layer_ms"] = m
    if engines[0].get("predicted_layer_s") is not None:
        out["predicted_layer_ms"] = 1e3 * engines[0]["predicted_layer_s"]
    if engines[0].get("auto_choice") is not None:
        out["auto_choice"] = engines[0]["auto_choice"]
    return out


def lines(rows: list[dict]) -> list[str]:
    """The lines under the bench table: per row, measured against predicted (the plan) and
    modelled (the delay model at the run's hits), and what ``auto`` chose."""
    out = []
    for r in rows:
        meas = r.get("measured_layer_ms")
        if meas is None:
            continue
        parts = []
        for name, key in (("predicted", "predicted_layer_ms"), ("modelled at its hits",
                                                                "modelled_layer_ms")):
            v = r.get(key)
            if v:
                parts.append(f"{name} {v:.2f} ms ({meas / v:.2f}x)")
        if parts:
            out.append(f"planner ({r['policy']}, budget {r['budget']}): measured {meas:.2f} ms per "
                       f"MoE layer per decode token; " + ", ".join(parts))
        ac = r.get("auto_choice")
        if ac and "codes" in ac:
            p = ac["predicted_layer_ms"]
            what = (f"{ac['summary']} (per MoE layer {ac['codes']})"
                    if ac.get("engine", "zipmoe") == "zipmoe"
                    else "zip-lru, one LRU pool shared by all layers")
            shared = f", one shared LRU pool {p['shared']:.3f}" if "shared" in p else ""
            out.append(f"auto (budget {r['budget']}): {what}; predicted ms per layer: per-layer "
                       f"plan {p['auto']:.3f}, LRU pools only {p['lru']:.3f}, tiers only "
                       f"{p['tiers']:.3f}{shared}")
        elif ac:
            out.append(f"auto (budget {r['budget']}): {ac['fallback']} ({ac['why']})")
    return out
