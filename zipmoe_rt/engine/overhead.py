"""The engine's own costs, measured by running it: what the planner's delay model adds to its
two resources (design note §3.5, §3.7).

The base delay model (:class:`~zipmoe_rt.engine.planner.DelayModel`) prices a one-token MoE
layer from isolated measurements: reads on one I/O channel, decodes on ``L`` workers, and the
matmuls. A Python engine spends more: per call it routes, schedules and bookkeeps on the main
thread, the fused matmul of ``k`` experts runs serially and, for experts outside the CPU cache,
at memory speed; per expert it prepares it sets up a task, hands it from the I/O thread to the
decode workers and back, and its decode shares the cores with the reads and the main thread.
On small models these terms dominate (a few hundred microseconds against experts that decode
in tens).

:func:`measure_engine_terms` runs the real :class:`~zipmoe_rt.engine.pipeline.ExpertEngine` in
five scenarios, each a one-token call whose ``k`` experts all come from one tier (F, C, S, E,
miss: a small set of experts per MoE layer placed in that tier by the plan), and times the
calls (:func:`time_scenarios`). With ``M_t`` the median wall time of scenario ``t`` and
``P_t`` the base model's makespan for ``k`` hits in ``t``:

* ``layer_fixed_s = M_F − P_F`` (the per-call overhead with nothing to prepare);
* ``load_<t>_s = (M_t − P_t − layer_fixed_s) / k`` for ``t`` in C, S, E, miss.

So the delay model with these terms reproduces the five measured calls, and prices a mixed
call by the base model plus the fixed term plus each prepared expert's term
(:meth:`~zipmoe_rt.engine.planner.DelayModel.engine_overhead_s`). ``zipmoe-rt calibrate``
stores them in ``MODEL.calib.json`` (:data:`TERM_KEYS`); :func:`apply_engine_terms` puts them
into a delay model.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

#: calibration keys of the engine terms (the :class:`DelayModel` fields of the same names)
TERM_KEYS = ("layer_fixed_s", "load_C_s", "load_S_s", "load_E_s", "load_miss_s")
#: scenarios in the order they are run: F last, after C (decodes only), since the aftermath of
#: reads (page-cache drops, I/O threads) slows the calls that follow them for a while
SCENARIOS = ("miss", "E", "S", "C", "F")


def _scenario_plan(tier: str, n: int, nres: int, layers: int, used: int):
    """Per MoE layer a :class:`TierPlan`: the first ``used`` layers hold experts
    ``0..nres-1`` in ``tier`` (F: a recency pool of ``nres``), the others nothing."""
    from .planner import TierPlan
    cnt = {t: (nres if t == tier else 0) for t in ("F", "C", "S", "E")}
    held = TierPlan(cnt["F"], cnt["C"], cnt["S"], cnt["E"], 0.0, 0.0, tuple(range(n)))
    empty = TierPlan(0, 0, 0, 0, 0.0, 0.0, tuple(range(n)))
    return [held] * used + [empty] * (layers - used)


#: bytes of full experts the F scenario may hold (it spans as many MoE layers as fit)
SCENARIO_BYTES = 256 << 20


def scenario_layers(source, max_bytes: int | None = None) -> int:
    """MoE layers the scenarios span: as many as hold ``min(N, 2k)`` full experts each within
    :data:`SCENARIO_BYTES` (at least 1, at most all).

    ``max_bytes``: a bound on what the scenario engines hold together (each engine's working
    set of ``k`` full experts, and per layer spanned ``min(N, 2k)`` experts in each of the
    F, C, S and E tiers), for a calibration inside a run whose memory is bounded; then 0 when
    not even one layer fits."""
    from .pipeline import budget_split
    hp = source.hparams
    n, k = int(hp["num_experts"]), int(hp["num_experts_per_tok"])
    bytes_F = budget_split(source, 1 << 62)[0]
    used = int(min(len(hp["moe_layers"]), max(1, SCENARIO_BYTES // (min(n, 2 * k) * bytes_F))))
    if max_bytes is None:
        return used
    lays = list(source.layouts.values())
    per_expert = bytes_F + max(l.sm_region[1] + l.exp_region[1] for l in lays) \
        + max(l.sm_region[1] for l in lays) + max(l.exp_region[1] for l in lays)
    fixed = len(SCENARIOS) * k * bytes_F
    fit = (int(max_bytes) - fixed) // (min(n, 2 * k) * per_expert)
    return int(max(0, min(used, fit)))


def _scenario_engine(source, tier: str, delay, workers: int, direct: bool, io_depth,
                     used: int = 1):
    """An :class:`ExpertEngine` whose first ``used`` MoE layers hold ``nres = min(N, 2k)``
    experts each in ``tier`` (none for ``miss``), slots fixed (no adaptation), and the number
    of experts its calls draw from (``nres``; all ``N`` for ``miss``). C slots hold the storage
    form, which the base delay model prices (a decode per C hit); a C tier in the compute form
    has no load to pay (:func:`~zipmoe_rt.engine.ctier.compute_form_delay`)."""
    from .pipeline import ExpertEngine, budget_split
    hp = source.hparams
    layers = list(hp["moe_layers"])
    n, k = int(hp["num_experts"]), int(hp["num_experts_per_tok"])
    nres = min(n, 2 * k)
    lays = [source.layouts[(layer, e)] for layer in layers[:used] for e in range(nres)]
    per = {"F": max(l.full_bytes for l in lays),
           "C": max(l.sm_region[1] + l.exp_region[1] for l in lays),
           "S": max(l.sm_region[1] for l in lays), "E": max(l.exp_region[1] for l in lays),
           "miss": 0}[tier]
    bytes_F = budget_split(source, 1 << 62)[0]
    budget = source.dense_bytes() + k * bytes_F + used * nres * per + (1 << 20)
    eng = ExpertEngine(source, budget, "zipmoe", "lru",
                       plan=_scenario_plan(tier, n, 0 if tier == "miss" else nres, len(layers),
                                           used),
                       ranks=[list(range(n))] * len(layers), workers=workers, direct=direct,
                       delay=delay, adapt=False, io_depth=io_depth, c_form="planes")
    return eng, (n if tier == "miss" else nres)


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
    """Median wall seconds of a one-token :meth:`ExpertEngine.run` whose ``k`` experts all come
    from one tier, for each tier of :data:`SCENARIOS`.

    One engine per scenario holds ``nres = min(N, 2k)`` experts in that tier in each of the
    first :func:`scenario_layers` MoE layers (none for ``miss``); each call routes one token
    to ``k`` distinct experts drawn from them (from all ``N`` for ``miss``) with random
    weights, the layers in turn as a token visits them, so that the CPU cache holds what it
    holds in a run. The tiers take turns in blocks: per round, for each tier, one untimed sweep
    over the layers (:data:`F_SETTLE_SWEEPS` for F) (which brings the tier's steady state back:
    after a tier with decodes, the full experts of every layer would otherwise come from memory,
    and F calls would pay for the other tiers' cache traffic) then two sweeps' worth of timed
    calls (at least :data:`BLOCK`;
    a tier's cost settles over a few calls after another tier's reads), so that a change in the
    machine's load touches every tier alike; a first round warms the JIT and the pools. F runs
    last, after C (:data:`SCENARIOS`). Reads drop their pages from the page cache
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
        ``{tier: seconds}``.

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
                eng, pool = engines[t]
                settle = len(layers) * (F_SETTLE_SWEEPS if t == "F" else 1)
                for j in range(settle + block):
                    layer = layers[step % len(layers)]
                    step += 1
                    idx = np.sort(rng.choice(pool, k, replace=False)).astype(np.int64)[None, :]
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


def measure_engine_terms(source, delay, workers: int, direct: bool = False,
                         io_depth: int | None = None, reps: int = 60,
                         max_bytes: int | None = None) -> dict:
    """The engine terms of the delay model on this machine for this model (see the module
    docstring for the method; the calls are :func:`time_scenarios`').

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

    Returns:
        ``{"layer_fixed_s", "load_C_s", "load_S_s", "load_E_s", "load_miss_s"}`` (seconds,
        may be negative) plus ``"engine_layer_s"``: ``{tier: M_t}``, the measured medians, and
        ``"engine_workers"``; ``{}`` where ``max_bytes`` holds not even one layer's scenarios
        (the delay model then has no engine terms).
    """
    if max_bytes is not None and scenario_layers(source, max_bytes) < 1:
        return {}
    base = dataclasses.replace(delay, **{t: 0.0 for t in TERM_KEYS})
    k = int(source.hparams["num_experts_per_tok"])
    meas = time_scenarios(source, base, workers, direct, io_depth, reps, max_bytes=max_bytes)
    pred = {t: base.layer_makespan({t: k}) for t in SCENARIOS}
    fixed = meas["F"] - pred["F"]
    out = {"layer_fixed_s": fixed}
    for t in ("C", "S", "E", "miss"):
        out[f"load_{t}_s"] = (meas[t] - pred[t] - fixed) / k
    out["engine_layer_s"] = meas
    out["engine_workers"] = int(workers)
    return out


def apply_engine_terms(delay, calib: dict):
    """``delay`` with the engine terms of a calibration dict (those it has; a calibration
    without them leaves ``delay`` as it is)."""
    terms = {t: float(calib[t]) for t in TERM_KEYS
             if isinstance(calib.get(t), (int, float)) and not isinstance(calib.get(t), bool)
             and np.isfinite(calib[t])}
    return dataclasses.replace(delay, **terms) if terms else delay
