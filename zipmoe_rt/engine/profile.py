"""Activation traces, machine calibration and the tier plan they give (design note §3).

* ``profile`` (:mod:`.trace`): run prompts through the model and count, per MoE layer, how
  often each expert is selected (batch 1, decode tokens), and keep the selections token by
  token (``sequences``), from which the planner measures temporal locality. Stored next to the
  model as ``MODEL.trace.json`` with a fingerprint of the source checkpoint, so a trace of
  another model is refused.
* ``calibrate`` (:mod:`.calibration`): measure this machine's constants on the model's own
  experts (SM read, exponent read from a cold page cache, decode of one expert on one worker,
  one expert's matmul) and store them as ``MODEL.calib.json``; :func:`load_checked_calibration`
  reads it back and warns (:class:`CalibrationWarning`) when it does not fit the run
  (:func:`calibration_mismatch`).
* :func:`make_plan`: planner inputs from both, and the per-layer tier plan under a budget.

This module holds the planning step and re-exports the names of :mod:`.trace` and
:mod:`.calibration`, so ``from zipmoe_rt.engine.profile import ...`` keeps working.
"""
from __future__ import annotations

import numpy as np

from .calibration import (CALIB_SUFFIX, CALIB_VERSION, CalibrationWarning, calibrate,
                          calibration_mismatch, delay_model, effective_workers, load_calibration,
                          load_checked_calibration)
from .planner import (DelayModel, inclusion_probabilities, locality_pool_model, lru_pool_model,
                      plan_model)
from .trace import (TRACE_SUFFIX, TraceError, TraceRecorder, fingerprint, load_trace,
                    record_trace, save_trace, sidecar)

__all__ = ["TRACE_SUFFIX", "CALIB_SUFFIX", "CALIB_VERSION", "TraceError", "CalibrationWarning",
           "fingerprint", "sidecar", "TraceRecorder", "record_trace", "save_trace", "load_trace",
           "calibrate", "load_calibration", "calibration_mismatch", "load_checked_calibration",
           "effective_workers", "delay_model", "pool_models", "make_plan", "make_plan_choices"]


def pool_models(trace: dict, top_k: int, ranks=None) -> list:
    """Per MoE layer, the :class:`~zipmoe_rt.engine.planner.FPoolModel` of a recency F pool.

    With the trace's ``sequences``: the engine's pool (LRU with frequency-aware admission)
    replayed on them (:func:`~zipmoe_rt.engine.planner.lru_pool_model`, warm-started with
    ``ranks[i]`` like the engine). Without (older traces): the mixture formula of
    :func:`~zipmoe_rt.engine.planner.locality_pool_model` with the layer's repeat probability
    (``repeat[i]``, else the trace-wide ``locality``, else memoryless ``Σπ²/k``).

    Raises:
        ValueError: as the planner functions (e.g. a layer with fewer than ``top_k`` experts
            seen).
    """
    counts = np.asarray(trace["counts"])
    L, N = counts.shape
    seqs = trace.get("sequences")
    if seqs:
        runs = [np.asarray(r, np.int64) for r in seqs]
        return [lru_pool_model([r[:, i, :] for r in runs], N, top_k,
                               ranks[i] if ranks is not None else None, admission=True)
                for i in range(L)]
    rep = trace.get("repeat") or [None] * L
    glob = trace.get("locality")
    out = []
    for i in range(L):
        pi = inclusion_probabilities(counts[i], top_k)
        rho = rep[i] if i < len(rep) and rep[i] is not None else glob
        if rho is None or not np.isfinite(rho):
            rho = float(np.sum(pi ** 2) / top_k)
        out.append(locality_pool_model(pi, min(max(float(rho), 0.0), 1.0), top_k))
    return out


#: the planner's grid of tier boundaries has at most this many steps per layer: every
#: boundary on a layer of up to 63 experts, a multiple of ``N // PLAN_GRID`` on wider ones.
#: On a 128-expert, top-8 layer (recency pool model of a 64-token trace) one layer's plans
#: took 61 s on the 2-core VM with every boundary, 0.4-0.7 s with multiples of 4, whose best
#: plan's predicted makespan was 0-4 % above the best of every boundary (0.3744 against 0.3671
#: ms at a 25 % budget); the cost grows as the grid's fourth power
PLAN_GRID = 32


def plan_step(n_experts: int) -> int:
    """The boundary step of the planner's grid for a layer of ``n_experts`` experts
    (:data:`PLAN_GRID`): 1 below 64 experts, ``n_experts // 32`` from there."""
    return max(1, int(n_experts) // PLAN_GRID)


def make_plan_choices(trace: dict, delay: DelayModel, tier_budget: int, top_k: int):
    """The ``auto`` policy's plans: ``(choices, ranks)``, ``choices`` =
    :func:`~zipmoe_rt.engine.planner.choice.plan_choices` (``"auto"``: each layer's kind free,
    ``"lru"``, ``"tiers"``) with recency F pools as :func:`make_plan` plans them, ``ranks`` as
    :func:`make_plan` returns them."""
    from .planner.choice import plan_choices
    counts = np.asarray(trace["counts"])
    ranks = [list(np.lexsort((np.arange(c.size), -c))) for c in counts]
    fpool = pool_models(trace, top_k, ranks)
    return plan_choices(counts, top_k, max(0, int(tier_budget)), delay, fpool=fpool,
                        step=plan_step(counts.shape[1])), ranks


def make_plan(trace: dict, delay: DelayModel, tier_budget: int, top_k: int,
              locality: bool = True):
    """Per-layer tier plans and expert ranks: ``(ModelPlan, ranks)``, ranks[i] = expert ids of
    the i-th MoE layer by descending trace count (ties by id).

    ``locality`` (default): recency F pools on top of static C/S/E slots, planned with the
    trace's temporal locality (:func:`pool_models`; the plans carry the static tiers' expert
    ``order``). ``locality=False``: the memoryless static plan by popularity rank (§3). The
    boundaries lie on the grid of :func:`plan_step` (every boundary below 64 experts)."""
    counts = np.asarray(trace["counts"])
    ranks = [list(np.lexsort((np.arange(c.size), -c))) for c in counts]
    fpool = pool_models(trace, top_k, ranks) if locality else None
    plan = plan_model(counts, top_k, max(0, int(tier_budget)), delay, fpool=fpool,
                      step=plan_step(counts.shape[1]))
    return plan, ranks
