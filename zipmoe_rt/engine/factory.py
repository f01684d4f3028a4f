"""Building the budgeted expert engine of a loaded model: the policy, and for ``zipmoe`` the
trace, calibration, delay model and tier plan it needs (ZipMoE, arXiv 2601.21198 §3, §4).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from . import profile as prof
from .pipeline import ExpertEngine, budget_split


def build_engine(source, budget, policy, eviction, workers, direct, trace, verify,
                 io_depth=None, *, warn_stacklevel: int = 1, backend=None,
                 host_budget: int = 0, gpu_ops=None,
                 prefetch: bool = False, resident: str = "full",
                 c_form: str = "packed") -> ExpertEngine:
    """The :class:`~zipmoe_rt.engine.pipeline.ExpertEngine` that runs ``source``'s experts
    within ``budget`` bytes.

    Policy ``auto`` becomes ``raw-lru`` for a file with raw experts, else, when an activation
    trace exists (``trace`` or ``MODEL.trace.json``), the zipmoe engine with each MoE layer's
    kind of plan (an LRU pool of full experts, C/S/E tiers, or a mix) chosen by the planner
    (:func:`~zipmoe_rt.engine.planner.choice.plan_choices`, recorded in the engine's
    ``auto_choice``, :func:`auto_choice`), or the ``zip-lru`` engine where its one LRU pool
    shared by all layers, replayed on the trace's token sequences, is predicted no slower than
    every per-layer plan (eviction ``lru``, CPU engine; on a tie, typically both predicted to
    hold every expert the trace uses, the shared pool, whose capacity is not divided among the
    layers by the trace's routing, so a text that routes otherwise than the trace's still
    finds room); else ``zip-lru``. For
    ``zipmoe``: the trace is loaded and checked against the model; the calibration stored next
    to the model (``MODEL.calib.json``) is used even when it does not fit this run (one
    :class:`~zipmoe_rt.engine.profile.CalibrationWarning`), and without one the machine is
    calibrated now (not saved); the delay model takes the largest SM, exponent and full sizes of
    any expert (a calibration measures one sample expert, and compressed exponent regions differ
    from expert to expert, so the sample's sizes could make the tiers outgrow the budget); the
    tier plan is :func:`~zipmoe_rt.engine.profile.make_plan` within the budget's tier bytes
    (:func:`~zipmoe_rt.engine.pipeline.budget_split`, checked before any calibration).

    Args:
        source: :class:`~zipmoe_rt.engine.store.ZmoeSource` of the model.
        budget: bytes for all weights (int).
        policy: ``auto``, ``zipmoe``, ``zip-lru`` or ``raw-lru``.
        eviction: ``lru``, ``lfu`` or ``tlfu`` for F caches.
        workers: decode workers L; None or 0 = ``os.cpu_count()``.
        direct: O_DIRECT reads of expert regions.
        trace: activation trace file, or None for ``MODEL.trace.json``.
        verify: check the CRC-32 of every piece read.
        io_depth: expert-region reads in flight (None = :data:`~zipmoe_rt.engine.io.IO_DEPTH`).
        warn_stacklevel: as for :func:`warnings.warn`, counted from the caller of this
            function: the frame a calibration warning is attributed to.
        backend: the compute backend of the experts (that of the model; default numba). On
            the ``cuda`` backend the engine is a
            :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine` (tiers in GPU memory,
            compressed uploads decoded on the GPU).
        host_budget: ``cuda`` only: bytes of pinned host memory for experts kept in host RAM.
        gpu_ops: device operations for the GPU engine (default: CUDA's); the host model
            :class:`~zipmoe_rt.engine.gpu_ops.HostOps` runs the GPU engine on the CPU (tests).
        prefetch: cross-layer prefetch (engine/prefetch.py; on the GPU engine/gpu_prefetch.py); its second
            working set is taken from the budget before the tiers are planned.
        resident: ``full`` or ``compressed``: the F caches of the host engine hold decoded
            BF16 experts or the compute form (engine/ctier.py); the policy is chosen the same
            way for both (``auto`` as above).
        c_form: ``packed`` (C slots computed in place from the compute form) or ``planes``
            (the storage form, decoded at use); ``planes`` is used whenever some expert is not
            packable. The planner prices C (and with ``compressed`` F) experts in the form they
            are held (:func:`~zipmoe_rt.engine.ctier.compute_form_delay`).

    Returns:
        the engine (the caller closes it).

    Raises:
        zipmoe_rt.engine.tiers.BudgetError: a budget below the dense weights plus one
            token's experts.
        zipmoe_rt.engine.profile.TraceError: policy ``zipmoe`` with a missing, invalid or
            mismatched trace, or an unreadable calibration.
    """
    lays = list(source.layouts.values())
    raw = all(p.raw for l in lays for p in l.pieces)
    trace_path = Path(trace) if trace else prof.sidecar(source.path, prof.TRACE_SUFFIX)
    auto = policy == "auto"
    if auto:
        policy = "raw-lru" if raw else ("zipmoe" if trace_path.exists() else "zip-lru")
    workers = workers or os.cpu_count() or 1
    cls, extra = _engine_class(backend, host_budget, gpu_ops)
    if prefetch:
        extra = dict(extra, prefetch=True)
    if cls is ExpertEngine:
        from .resident import packable
        if not all(packable(l) for l in lays):
            c_form = "planes"
        extra = dict(extra, resident=resident, c_form=c_form)
    if policy != "zipmoe":
        eng = cls(source, budget, policy, eviction, workers=workers, direct=direct,
                  verify=verify, io_depth=io_depth, backend=backend, **extra)
        if auto:
            eng.auto_choice = {"fallback": policy,
                               "why": "raw experts" if raw else "no activation trace"}
        return eng
    tier_budget = budget_split(source, budget, cls.prefetch_second_set(
        source.layouts, extra.get("prefetch", False)))[2]   # too small a budget: no calibration noise first
    tr = prof.load_trace(trace_path, source)
    # a stored calibration that does not fit this run (other version, read mode, io depth or
    # machine) is used anyway, with one CalibrationWarning (attributed as warn_stacklevel says);
    # none stored: calibrate now (not saved), its scenario engines within the budget's experts'
    # share (the run's caches are still empty then), so a memory limit holds while it measures
    calib = prof.load_checked_calibration(source.path, direct, stacklevel=warn_stacklevel + 1,
                                          io_depth=io_depth)
    if calib is None:
        # within half the tier budget: the measurement's own transient (its decode buffers, the
        # kernels it compiles) must fit beside its scenario engines under a memory limit
        calib = prof.calibrate(source, direct=direct, io_depth=io_depth,
                               max_bytes=tier_budget // 2)
        # what the measurement freed (its scenario engines' caches) and the library code pages
        # it touched go back before the tiers fill: a memory limit counts them until then
        from .footprint import release
        release()
    # plan with the largest region sizes of any expert: a calibration measures one sample
    # expert, and compressed exponent regions differ in size from expert to expert, so planning
    # with the sample's sizes can make the tiers outgrow the budget (BudgetError at load)
    delay = dataclasses.replace(prof.delay_model(calib, workers),
                                bytes_F=max(l.full_bytes for l in lays),
                                bytes_sm=max(l.sm_region[1] for l in lays),
                                bytes_exp=max(l.exp_region[1] for l in lays))
    if cls is ExpertEngine:
        from .ctier import compute_form_delay
        delay, share = compute_form_delay(delay, source, calib, resident, c_form, backend)
        extra = dict(extra, escape_share=share)
    if cls is not ExpertEngine:   # the engine terms are the CPU engine's (engine/overhead.py)
        from .overhead import TERM_KEYS
        delay = dataclasses.replace(delay, **{t: 0.0 for t in TERM_KEYS})
    k = int(source.hparams["num_experts_per_tok"])
    if auto:
        choices, ranks = prof.make_plan_choices(tr, delay, tier_budget, k)
        plan = choices["auto"]
        shared = _shared_pool_s(source, tr, budget, extra.get("prefetch", False), delay, k,
                                resident, extra.get("escape_share")) \
            if eviction == "lru" and cls is ExpertEngine else None
        if shared is not None and shared <= plan.predicted_makespan_s:
            eng = cls(source, budget, "zip-lru", eviction, workers=workers, direct=direct,
                      verify=verify, io_depth=io_depth, backend=backend, **extra)
            eng.auto_choice = auto_choice(choices, shared, engine="zip-lru")
            return eng
    else:
        plan, ranks = prof.make_plan(tr, delay, tier_budget, k)
    eng = cls(source, budget, "zipmoe", eviction, plan=plan.layers, ranks=ranks,
              workers=workers, direct=direct, verify=verify, delay=delay,
              io_depth=io_depth, backend=backend, **extra)
    if auto:
        eng.auto_choice = auto_choice(choices, shared)
    return eng


def _shared_pool_s(source, trace, budget, prefetch, delay, k, resident="full",
                   escape_share=None):
    """Predicted one-token MoE time (seconds, all layers) of the ``zip-lru`` engine's shared
    LRU pool (:func:`shared_pool_capacity` experts), replayed on the trace's sequences; None
    for a trace without them."""
    from .planner.choice import shared_pool_layer_s
    seqs = trace.get("sequences")
    if not seqs:
        return None
    bytes_F, _, tier = budget_split(source, budget, prefetch)
    runs = [r for r in (np.asarray(s, np.int64) for s in seqs) if r.size]
    if not runs:
        return None
    n = int(source.hparams["num_experts"])
    return float(shared_pool_layer_s(runs, n, k, shared_pool_capacity(
        source, tier, resident, escape_share), delay).sum())


def shared_pool_capacity(source, tier_bytes: int, resident: str = "full",
                         escape_share: float | None = None) -> int:
    """Experts the ``zip-lru`` engine's one shared pool holds in ``tier_bytes``: full BF16
    experts, or with ``resident="compressed"`` compute-form experts at their planned size
    (:func:`~zipmoe_rt.engine.resident.compute_form_bytes` of the largest at
    ``escape_share``; BF16 bytes for a file with an expert that is not packable), as
    :meth:`~zipmoe_rt.engine.ctier.CTierMixin._shared_pool` sizes it."""
    from .ctier import ESCAPE_SHARE
    from .resident import compute_form_bytes, packable
    lays = list(source.layouts.values())
    per = max(l.full_bytes for l in lays)
    if resident == "compressed":
        share = ESCAPE_SHARE if escape_share is None else float(escape_share)
        per = max(compute_form_bytes(l, share) if packable(l) else l.full_bytes for l in lays)
    return int(tier_bytes // per)


def auto_choice(choices: dict, shared: float | None = None, engine: str = "zipmoe") -> dict:
    """What ``auto`` chose, for ``bench``, the banner and ``/stats``: ``engine`` (``zipmoe``:
    the per-layer plans; ``zip-lru``: one LRU pool shared by all layers, where the replay of
    the trace predicts it faster), ``codes`` (one letter per MoE layer of the per-layer plan,
    :func:`~zipmoe_rt.engine.planner.choice.choice_codes`), ``summary`` (layers per kind), and
    ``predicted_layer_ms``: the mean predicted one-token MoE layer time (ms) of the per-layer
    plan (``auto``), of the LRU-pools-only and tiers-only plans of the same budget and, when
    the trace has token sequences, of the shared pool (``shared``).

    Args:
        choices: :func:`~zipmoe_rt.engine.planner.choice.plan_choices`' result.
        shared: the shared pool's predicted time, seconds for all layers (or None).
        engine: the engine ``auto`` runs."""
    from .planner.choice import choice_codes, choice_summary
    n = max(1, len(choices["auto"].layers))
    pred = {kind: 1e3 * mp.predicted_makespan_s / n for kind, mp in choices.items()}
    if shared is not None:
        pred["shared"] = 1e3 * shared / n
    return {"engine": engine, "codes": choice_codes(choices["auto"].layers),
            "summary": choice_summary(choices["auto"].layers), "predicted_layer_ms": pred}


def has_c_slots(engine) -> bool:
    """Whether ``engine`` (an expert engine, or None) plans any C slot: a ``zipmoe`` plan
    (``auto``'s per-layer plans included) with ``nC > 0`` in some MoE layer. ``--c-tier``
    has an effect only then; an ``auto`` plan of LRU pools alone has no C slot."""
    return any(getattr(tp, "nC", 0) > 0 for tp in (getattr(engine, "plan", None) or ()))


def describe_auto(choice: dict | None, policy: str) -> str:
    """The policy as the banner and ``/stats`` show it: ``policy`` (the engine's), followed,
    when ``auto`` chose it, by what it chose (``choice``: :func:`auto_choice` or a fallback),
    e.g. ``zipmoe (auto: lru 20, mix 6, tiers 4; per MoE layer LLMT...)`` or
    ``zip-lru (auto: no activation trace)``; the per-layer letters only up to 64 layers."""
    if not choice:
        return policy
    if "fallback" in choice:
        return f"{policy} (auto: {choice['why']})"
    if choice.get("engine") == "zip-lru":
        return f"{policy} (auto: one LRU pool for all layers, predicted no slower)"
    codes = choice["codes"]
    per = f"; per MoE layer {codes}" if len(codes) <= 64 else ""
    return f"{policy} (auto: {choice['summary']}{per})"


def _engine_class(backend, host_budget, gpu_ops):
    """(engine class, its extra arguments): the GPU engine for the ``cuda`` backend or given
    device operations, else :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`."""
    if gpu_ops is None and getattr(backend, "name", backend) != "cuda":
        return ExpertEngine, {}
    from .gpu_engine import GpuExpertEngine
    if gpu_ops is None:
        from ..backends.cuda_experts import CudaOps
        gpu_ops = CudaOps()
    return GpuExpertEngine, {"ops": gpu_ops, "host_budget": int(host_budget or 0)}
