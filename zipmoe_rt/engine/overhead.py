"""The engine's own costs, measured by running it: what the planner's delay model adds to its
two resources (design note §3.5, §3.7, §3.8).

The base delay model (:class:`~zipmoe_rt.engine.planner.DelayModel`) prices a one-token MoE
layer from isolated measurements: reads on one I/O channel, decodes on ``L`` workers, and the
matmuls. A Python engine spends more: per call it routes, schedules and bookkeeps on the main
thread, the fused matmul of ``k`` experts runs serially and, for experts outside the CPU cache,
at memory speed; per expert it prepares it sets up a task, hands it from the I/O thread to the
decode workers and back, and its decode shares the cores with the reads and the main thread.
On small models these terms dominate (a few hundred microseconds against experts that decode
in tens). And the reads of one call overlap otherwise than the calibration's read pass says:
a call's first read waits its whole latency, further reads in flight beside it add little.

:func:`measure_engine_terms` runs the real :class:`~zipmoe_rt.engine.pipeline.ExpertEngine` in
the one-token calls of :data:`SCENARIOS` (:func:`scenario_hits`): ``F``, all ``k`` experts F
hits; ``C1``, ``S1``, ``E1``, ``miss1``, ``k − 1`` F hits and ONE expert prepared from that
tier (the calls a run makes most: most calls that load, load one expert); ``miss``, all ``k``
experts read, for the overlap of reads. :func:`fit_engine_terms` turns the medians ``M`` into
the terms, with ``P(h)`` the delay model's makespan of hits ``h``:

* ``layer_fixed_s = M_F − P(F)`` (the per-call overhead with nothing to prepare);
* the read price: a further miss beside the first costs ``(M_miss − M_miss1)/(k − 1)``
  (its regions at the concurrent read throughput), which replaces the calibration's
  ``sm_read_s + exp_read_s`` (split in their ratio, never above the one-at-a-time reads);
* ``read_first_s``: what ``miss1`` takes beyond that price on the I/O side (the first read's
  latency, and a miss's own engine costs), at least 0; a call that reads only exponent regions
  waits it in proportion to their read (:meth:`~zipmoe_rt.engine.planner.DelayModel.
  io_and_compute`);
* ``load_<t>_s = max(0, M_<t>1 − P(<t>1))`` for ``t`` in C, S, E, miss with the terms above:
  the marginal cost of one load of that tier. Never negative: a load never makes a call
  faster, so where the base model prices one load above what it took (timing noise, or a
  base constant measured pessimistic) the prediction keeps the base price.

So the delay model with these terms reproduces the one-load calls and the ``k``-miss call
(where neither clamp acts and the calls are I/O-bound), and prices a mixed call by the base
model plus the fixed term plus each prepared expert's term
(:meth:`~zipmoe_rt.engine.planner.DelayModel.engine_overhead_s`). ``zipmoe-rt calibrate``
stores them in ``MODEL.calib.json`` (:data:`TERM_KEYS`, and the fitted read prices as
``sm_read_s``/``exp_read_s``); :func:`apply_engine_terms` puts them into a delay model.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

#: calibration keys of the engine terms (the :class:`DelayModel` fields of the same names)
TERM_KEYS = ("layer_fixed_s", "load_C_s", "load_S_s", "load_E_s", "load_miss_s", "read_first_s")
#: scenarios in the order they are run (:func:`scenario_hits`): F last, after C1 (decodes
#: only), since the aftermath of reads (page-cache drops, I/O threads) slows the calls that
#: follow them for a while
SCENARIOS = ("miss", "miss1", "E1", "S1", "C1", "F")


def scenario_hits(name: str, k: int) -> dict:
    """Hits per tier of each call of scenario ``name`` in a top-``k`` layer: ``F`` and
    ``miss``: all ``k`` from that tier; ``<t>1``: ``k − 1`` F hits and one from tier ``t``."""
    if name in ("F", "miss"):
        return {name: k}
    if name[:-1] not in ("C", "S", "E", "miss") or name[-1] != "1":
        raise ValueError(f"unknown scenario {name!r}; expected one of {SCENARIOS}")
    return {"F": k - 1, name[:-1]: 1} if k > 1 else {name[:-1]: 1}


def _scenario_sets(name: str, n: int, k: int):
    """``(nF, tier, held, fixed, choices)`` of a scenario: the F pool's size, the tier of its
    ``held`` static slots (experts after the F ones), the experts every call routes to
    (``fixed``: the F hits of a one-load scenario, the pool's first experts) and those it
    draws the rest from."""
    if name == "F":
        return min(n, 2 * k), "F", 0, [], list(range(min(n, 2 * k)))
    if name == "miss":
        return 0, "miss", 0, [], list(range(n))
    tier, nF = name[:-1], k - 1
    held = 0 if tier == "miss" else min(k, n - nF)
    return nF, tier, held, list(range(nF)), list(range(nF, n if tier == "miss" else nF + held))


def _scenario_plan(name: str, n: int, k: int, layers: int, used: int):
    """Per MoE layer a static :class:`TierPlan`: the first ``used`` layers hold the
    scenario's experts (:func:`_scenario_sets`: an F pool of experts ``0..nF-1``, slots of one
    tier on the experts after them), the others nothing."""
    from .planner import TierPlan
    nF, tier, held, _, _ = _scenario_sets(name, n, k)
    cnt = {t: (held if t == tier else 0) for t in ("C", "S", "E")}
    full = TierPlan(nF, cnt["C"], cnt["S"], cnt["E"], 0.0, 0.0)
    empty = TierPlan(0, 0, 0, 0, 0.0, 0.0)
    return [full] * used + [empty] * (layers - used)


#: bytes of full experts the F scenario may hold (it spans as many MoE layers as fit)
SCENARIO_BYTES = 256 << 20


def _region_bytes(lays) -> dict:
    """Largest bytes per expert of each tier over ``lays`` (miss: 0)."""
    return {"F": max(l.full_bytes for l in lays),
            "C": max(l.sm_region[1] + l.exp_region[1] for l in lays),
            "S": max(l.sm_region[1] for l in lays), "E": max(l.exp_region[1] for l in lays),
            "miss": 0}


def scenario_layers(source, max_bytes: int | None = None) -> int:
    """MoE layers the scenarios span: as many as hold ``min(N, 2k)`` full experts each within
    :data:`SCENARIO_BYTES` (at least 1, at most all).

    ``max_bytes``: a bound on what the scenario engines hold together (each engine's working
    set of ``k`` full experts, and per layer spanned the experts of every scenario,
    :func:`_scenario_sets`), for a calibration inside a run whose memory is bounded; then 0
    when not even one layer fits."""
    from .pipeline import budget_split
    hp = source.hparams
    n, k = int(hp["num_experts"]), int(hp["num_experts_per_tok"])
    bytes_F = budget_split(source, 1 << 62)[0]
    used = int(min(len(hp["moe_layers"]), max(1, SCENARIO_BYTES // (min(n, 2 * k) * bytes_F))))
    if max_bytes is None:
        return used
    per = _region_bytes(list(source.layouts.values()))
    per["F"] = bytes_F
    per_layer = 0
    for name in SCENARIOS:
        nF, tier, held, _, _ = _scenario_sets(name, n, k)
        per_layer += nF * per["F"] + held * per[tier]
    fixed = len(SCENARIOS) * k * bytes_F
    fit = (int(max_bytes) - fixed) // per_layer
    return int(max(0, min(used, fit)))


def _scenario_engine(source, name: str, delay, workers: int, direct: bool, io_depth,
                     used: int = 1):
    """An :class:`ExpertEngine` whose first ``used`` MoE layers hold scenario ``name``'s
    experts (:func:`_scenario_sets`), slots fixed (no adaptation); with ``(fixed, choices)``:
    each call routes to ``fixed`` and ``k − len(fixed)`` experts drawn from ``choices``. C
    slots hold the storage form, which the base delay model prices (a decode per C hit); a C
    tier in the compute form has no load to pay
    (:func:`~zipmoe_rt.engine.ctier.compute_form_delay`). A one-load scenario's F pool evicts
    by use counts seeded with the ranks (``lfu``): its experts serve every call and outrank the
    loaded one, which it never admits (a recency pool's admission lets the first one in on a
    tie, and the next call would miss an F expert)."""
    from .pipeline import ExpertEngine, budget_split
    hp = source.hparams
    layers = list(hp["moe_layers"])
    n, k = int(hp["num_experts"]), int(hp["num_experts_per_tok"])
    nF, tier, held, fixed, choices = _scenario_sets(name, n, k)
    lays = [source.layouts[(layer, e)] for layer in layers[:used] for e in range(nF + held)]
    per = _region_bytes(lays) if lays else {"F": 0, tier: 0}
    bytes_F = budget_split(source, 1 << 62)[0]
    budget = source.dense_bytes() + k * bytes_F + used * (nF * per["F"] + held * per[tier]) \
        + (1 << 20)
    eng = ExpertEngine(source, budget, "zipmoe", "lfu" if fixed else "lru",
                       plan=_scenario_plan(name, n, k, len(layers), used),
                       ranks=[list(range(n))] * len(layers), workers=workers, direct=direct,
                       delay=delay, adapt=False, io_depth=io_depth, c_form="planes")
    return eng, (fixed, choices)


#: fewest timed calls of one tier in a row (a block; at least two sweeps over the layers),
#: after one untimed sweep
BLOCK = 8
#: untimed sweeps over the layers before the F block (the others: one). The F calls price every
#: call's fixed cost (``layer_fixed_s``), so they are timed where the other tiers' reads and
#: decodes have faded from the caches: one sweep after them left the trained model of
#: docs/benchmarks.md §18 at 0.144 ms per call against 0.11-0.12 ms for F calls in a row (what a
#: run whose experts are all resident pays); the load terms then carry what the aftermath of a
#: load costs the calls that load.
F_SETTLE_SWEEPS = 4


def time_scenarios(source, delay, workers: int, direct: bool = False,
                   io_depth: int | None = None, reps: int = 60, seed: int = 0,
                   max_bytes: int | None = None) -> dict:
    """Median wall seconds of a one-token :meth:`ExpertEngine.run` with the hits of each
    scenario of :data:`SCENARIOS` (:func:`scenario_hits`).

    One engine per scenario holds its experts (:func:`_scenario_sets`) in each of the first
    :func:`scenario_layers` MoE layers: ``F``, ``min(N, 2k)`` in the F pool; ``miss``, none;
    ``<t>1``, ``k − 1`` in the F pool and ``min(k, N − k + 1)`` slots of tier ``t`` (none for
    ``miss1``). Each call routes one token to ``k`` distinct experts (a one-load scenario: its
    F experts and one drawn from the others) with random weights, the layers in turn as a token
    visits them, so that the CPU cache holds what it holds in a run. The scenarios take turns
    in blocks: per round, for each scenario, one untimed sweep over the layers
    (:data:`F_SETTLE_SWEEPS` for F) (which brings the scenario's steady state back:
    after a tier with decodes, the full experts of every layer would otherwise come from memory,
    and F calls would pay for the other tiers' cache traffic) then two sweeps' worth of timed
    calls (at least :data:`BLOCK`;
    a tier's cost settles over a few calls after another tier's reads), so that a change in the
    machine's load touches every tier alike; a first round warms the JIT and the pools. F runs
    last, after C1 (:data:`SCENARIOS`). Reads drop their pages from the page cache
    (:class:`~zipmoe_rt.engine.io.RegionReader`), so every read is cold, as in a run.

    Args:
        source: :class:`~zipmoe_rt.engine.store.ZmoeSource` with compressed experts.
        delay: the base :class:`DelayModel` (the engine's scheduler uses its costs).
        workers: decode workers of the engines.
        direct, io_depth: as for :class:`ExpertEngine`.
        reps: timed calls per scenario (rounded up to whole blocks).
        seed: routing seed.
        max_bytes: bound on the scenario engines' bytes (:func:`scenario_layers`).

    Returns:
        ``{scenario: seconds}``.

    Raises:
        ValueError: ``reps < 1``, or ``max_bytes`` too small for one layer.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    hp = source.hparams
    used = scenario_layers(source, max_bytes)
    if used < 1:
        raise ValueError(f"the engine-term scenarios need more than {max_bytes} bytes")
    layers = [int(l) for l in hp["moe_layers"][:used]]
    k = int(hp["num_experts_per_tok"])
    rng = np.random.default_rng(seed)
    engines = {}
    try:
        for t in SCENARIOS:
            engines[t] = _scenario_engine(source, t, delay, workers, direct, io_depth, used)
        be = engines["F"][0].backend
        x = be.from_host(rng.standard_normal((1, int(hp["hidden_size"]))).astype(np.float32))
        times = {t: [] for t in SCENARIOS}
        step = 0
        block = max(BLOCK, 2 * len(layers))
        for r in range(-(-reps // block) + 1):
            for t in SCENARIOS:
                eng, (fixed, choices) = engines[t]
                settle = len(layers) * (F_SETTLE_SWEEPS if t == "F" else 1)
                for j in range(settle + block):
                    layer = layers[step % len(layers)]
                    step += 1
                    drawn = rng.choice(choices, k - len(fixed), replace=False)
                    idx = np.sort(np.concatenate([fixed, drawn])).astype(np.int64)[None, :]
                    w = rng.random((1, k)).astype(np.float32)
                    w /= w.sum()
                    t0 = time.perf_counter()
                    eng.run(layer, x, idx, w)
                    dt = time.perf_counter() - t0
                    if r > 0 and j >= settle:
                        times[t].append(dt)
        return {t: float(np.median(v)) for t, v in times.items()}
    finally:
        for eng, _ in engines.values():
            eng.close()


def fit_engine_terms(meas: dict, delay, k: int, max_read_s: float | None = None) -> dict:
    """The engine terms and read prices that make ``delay`` price the scenario calls ``meas``
    (the method of the module docstring).

    Args:
        meas: ``{scenario: seconds}`` for every scenario of :data:`SCENARIOS`, as
            :func:`time_scenarios` returns them.
        delay: the base :class:`DelayModel` (its engine terms are ignored).
        k: experts per token.
        max_read_s: the one-at-a-time read time of one expert's two regions (seconds), the
            highest read price the fit sets (default: no bound).

    Returns:
        ``{"layer_fixed_s", "load_C_s", "load_S_s", "load_E_s", "load_miss_s",
        "read_first_s", "sm_read_s", "exp_read_s"}``, seconds: the terms (the loads and
        ``read_first_s`` at least 0) and the read prices of one expert's regions on the I/O
        channel (``delay``'s where ``k < 2`` or a further miss measured no slower than the
        first, which leaves the overlap unmeasured).
    """
    base = dataclasses.replace(delay, **{t: 0.0 for t in TERM_KEYS})
    per_miss = base.sm_read_s + base.exp_read_s
    slope = (meas["miss"] - meas["miss1"]) / (k - 1) if k > 1 else 0.0
    if slope > 0 and per_miss > 0:
        price = min(slope, max_read_s) if max_read_s else slope
        base = dataclasses.replace(base, sm_read_s=base.sm_read_s * price / per_miss,
                                   exp_read_s=base.exp_read_s * price / per_miss)
    fixed = meas["F"] - base.layer_makespan(scenario_hits("F", k))
    base = dataclasses.replace(base, layer_fixed_s=fixed)
    # the one-miss call's I/O side: its target, what the read price gives, the compute side
    hits = scenario_hits("miss1", k)
    io, comp = base.io_and_compute(hits["miss"], hits["miss"], hits["miss"])
    target = meas["miss1"] - fixed - base.matmul_time(k)
    first = max(0.0, target - float(io)) if target > float(comp) else 0.0
    base = dataclasses.replace(base, read_first_s=first)
    out = {"layer_fixed_s": fixed, "read_first_s": first,
           "sm_read_s": base.sm_read_s, "exp_read_s": base.exp_read_s}
    for t in ("C", "S", "E", "miss"):
        one = base.layer_makespan(scenario_hits(f"{t}1", k))
        out[f"load_{t}_s"] = max(0.0, meas[f"{t}1"] - one)
    return out


def measure_engine_terms(source, delay, workers: int, direct: bool = False,
                         io_depth: int | None = None, reps: int = 60,
                         max_bytes: int | None = None, max_read_s: float | None = None) -> dict:
    """The engine terms of the delay model on this machine for this model (see the module
    docstring for the method; the calls are :func:`time_scenarios`', the fit
    :func:`fit_engine_terms`).

    Args:
        source: :class:`~zipmoe_rt.engine.store.ZmoeSource` with compressed experts.
        delay: the base :class:`DelayModel` of the same calibration (its engine terms are
            ignored).
        workers: decode workers of the engine (the run's; ``delay.workers`` is the effective
            parallelism the base model uses).
        direct, io_depth: as for :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`.
        reps: timed calls per scenario.
        max_bytes: bound on what the scenario engines hold together (:func:`scenario_layers`;
            a calibration inside a run under a memory budget passes the budget's expert part).
        max_read_s: as for :func:`fit_engine_terms`.

    Returns:
        :func:`fit_engine_terms`' dict plus ``"engine_layer_s"``: ``{scenario: M}``, the
        measured medians, and ``"engine_workers"``; ``{}`` where ``max_bytes`` holds not even
        one layer's scenarios (the delay model then has no engine terms).
    """
    if max_bytes is not None and scenario_layers(source, max_bytes) < 1:
        return {}
    base = dataclasses.replace(delay, **{t: 0.0 for t in TERM_KEYS})
    k = int(source.hparams["num_experts_per_tok"])
    meas = time_scenarios(source, base, workers, direct, io_depth, reps, max_bytes=max_bytes)
    out = fit_engine_terms(meas, base, k, max_read_s)
    out["engine_layer_s"] = meas
    out["engine_workers"] = int(workers)
    return out


def apply_engine_terms(delay, calib: dict):
    """``delay`` with the engine terms of a calibration dict (those it has, ``read_first_s``
    only when at least 0; a calibration without them leaves ``delay`` as it is)."""
    terms = {t: float(calib[t]) for t in TERM_KEYS
             if isinstance(calib.get(t), (int, float)) and not isinstance(calib.get(t), bool)
             and np.isfinite(calib[t]) and (t != "read_first_s" or calib[t] >= 0)}
    return dataclasses.replace(delay, **terms) if terms else delay
