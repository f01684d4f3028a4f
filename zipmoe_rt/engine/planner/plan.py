"""Tier plans: how many experts of each MoE layer each cache tier holds, the fastest within a
byte budget (ZipMoE, arXiv 2601.21198 §3.5 for one layer, §3 with per-layer budgets for a model).

:func:`plan_layer` searches one layer's plans exhaustively; :func:`plan_model` runs the whole
pipeline per layer (popularity, ``π``, conditional-Poisson fit, frontier; or a recency F pool
model, §3.6) and splits one model-wide budget over the layers (:mod:`.split`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .checks import check_budget, check_k, check_vector, check_weights
from .conditional_poisson import fit_conditional_poisson, inclusion_probabilities, popularity_by_rank
from .delay import DelayModel
from .frontier import LayerFrontier, layer_frontier
from .locality import layer_frontier_lru
from .split import refine_split, split_dp, split_greedy


@dataclass(frozen=True)
class TierPlan:
    """How many of one layer's experts each cache tier holds (§3).

    Static plan (``order is None``, :func:`plan_layer`, :func:`plan_model` without ``fpool``):
    by popularity rank, the ``nF`` most popular experts are tier F, the next ``nC`` tier C, then
    ``nS`` S, ``nE`` E; the rest are not cached (miss).

    Recency plan (``order`` set, :func:`plan_model` with ``fpool``, §3.6): F is an LRU pool of
    ``nF`` full experts over all the layer's experts, and the static slots go to
    ``order[:nC]`` (C), ``order[nC:nC+nS]`` (S), ``order[nC+nS:nC+nS+nE]`` (E); an expert in
    the pool is an F hit, one evicted from it falls back to its static slot (or to a miss).

    Attributes:
        nF, nC, nS, nE: experts per tier.
        predicted_makespan_s: expected layer makespan per token (seconds, :class:`DelayModel`).
        bytes: cache bytes the plan uses (:meth:`DelayModel.plan_bytes`).
        order: expert ids by static-tier rank (recency plans), or None (static plans).
    """

    nF: int
    nC: int
    nS: int
    nE: int
    predicted_makespan_s: float
    bytes: float
    order: tuple | None = None

    def tier_of_rank(self, num_experts: int) -> list[str]:
        """Tier name of each popularity rank ``0..num_experts−1`` (most popular first).

        Raises:
            ValueError: ``num_experts`` smaller than ``nF + nC + nS + nE``."""
        used = self.nF + self.nC + self.nS + self.nE
        if num_experts < used:
            raise ValueError(f"plan holds {used} experts > num_experts={num_experts}")
        return (["F"] * self.nF + ["C"] * self.nC + ["S"] * self.nS + ["E"] * self.nE
                + ["miss"] * (num_experts - used))


def _as_weights(pi_or_w, k: int, is_w) -> np.ndarray:
    a = check_vector(pi_or_w, "pi_or_w")
    if is_w is None:
        is_w = not ((a >= 0).all() and (a <= 1).all() and abs(a.sum() - k) <= 1e-9 * k)
    if is_w:
        return check_weights(a, allow_inf=True)
    return fit_conditional_poisson(a, k)


def _pick(t: LayerFrontier, budget: float) -> int:
    """Index of the fastest plan within ``budget``; ties (rel. 1e-12): fewer bytes, then more
    experts in the higher tiers (lexicographically larger ``(nF, nC, nS, nE)``)."""
    ok = np.flatnonzero(t.bytes <= budget)
    em = t.makespan_s[ok]
    best = em.min()
    cand = ok[em <= best * (1 + 1e-12) + 1e-300]
    sub = LayerFrontier(t.counts[cand], t.bytes[cand], t.makespan_s[cand])
    o = np.lexsort((-sub.counts[:, 3], -sub.counts[:, 2], -sub.counts[:, 1], -sub.counts[:, 0],
                    sub.bytes))
    return int(cand[o[0]])


def _plan_of(t: LayerFrontier, i: int, orders=None) -> TierPlan:
    c = t.counts[i]
    return TierPlan(int(c[0]), int(c[1]), int(c[2]), int(c[3]), float(t.makespan_s[i]),
                    float(t.bytes[i]), orders[int(c[0])] if orders is not None else None)


def plan_layer(pi_or_w, k, budget_bytes, delay: DelayModel, step: int = 1,
               is_w: bool | None = None) -> TierPlan:
    """The tier plan of one layer with the least expected makespan within a byte budget (§3.5).

    Exhaustive over all ``(nF, nC, nS, nE)`` on the boundary grid (:func:`layer_frontier`), so
    exact for ``step = 1``. Ties (relative ``1e-12``) go to fewer bytes, then to more experts in
    the higher tiers.

    Args:
        pi_or_w: float ``[N]``: inclusion probabilities (in ``[0, 1]``, summing to ``k``; fitted
            with :func:`fit_conditional_poisson`) or conditional-Poisson weights. Any order: the
            experts are ranked by it.
        k: experts per token, ``1..N``.
        budget_bytes: cache bytes this layer may use, ``>= 0``.
        delay: the :class:`DelayModel`.
        step: boundary grid step (see :func:`layer_frontier`).
        is_w: True = the input is weights, False = probabilities, None (default) = probabilities
            when all in ``[0, 1]`` with sum ``k`` (within ``1e-9·k``), else weights.

    Returns:
        :class:`TierPlan` (``bytes <= budget_bytes``).

    Raises:
        ValueError: negative or non-finite budget, ``k`` out of range, bad ``π`` / weights.
    """
    budget = check_budget(budget_bytes, "budget_bytes")
    a = check_vector(pi_or_w, "pi_or_w")
    k = check_k(k, a.shape[0])
    w = _as_weights(a, k, is_w)
    t = layer_frontier(w, k, delay, step)
    return _plan_of(t, _pick(t, budget))


class ModelPlan(NamedTuple):
    """Result of :func:`plan_model`; unpacks as ``(layers, predicted_makespan_s)``.

    Attributes:
        layers: one :class:`TierPlan` per MoE layer, in trace order.
        predicted_makespan_s: Σ of the layers' expected makespans: the predicted MoE time of one
            token (seconds).
    """

    layers: list
    predicted_makespan_s: float

    @property
    def bytes(self) -> float:
        """Cache bytes of all layers together."""
        return float(sum(p.bytes for p in self.layers))



def plan_model(counts, k, total_budget_bytes, delay: DelayModel, *, average: bool = False,
               step: int = 1, shape: tuple[int, int] | None = None,
               fpool: list | None = None) -> ModelPlan:
    """Tier plans of every MoE layer under one model-wide byte budget (§3, per-layer budgets).

    Per layer: popularity by rank (:func:`popularity_by_rank`), ``π``
    (:func:`inclusion_probabilities`), conditional-Poisson weights
    (:func:`fit_conditional_poisson`), and the Pareto frontier of all its tier plans, bytes vs
    expected makespan (:func:`layer_frontier`).

    Budget split, a multiple-choice knapsack over the layers' Pareto frontiers (pick one plan per
    layer, bytes summing to at most the budget, least total makespan); two solvers, each
    followed by a refinement, and the better result is returned:

    * Greedy marginal allocation on the lower convex hull of each frontier: every layer starts
      with no cache; repeatedly take, over all layers, the next hull step with the largest
      makespan reduction per byte that still fits the remaining budget (a layer whose next step
      does not fit takes no further hull steps). Up to the first refusal this is exactly the
      LP-relaxation optimum, so the result is within one hull step's makespan gain of the
      optimal split (and optimal when the budget lands on hull vertices). Good for many layers
      with fine-grained frontiers.
    * Min-plus dynamic programming over the budget in quanta: exact when every plan's bytes are
      integers and the budget is at most 65536 (quantum = 1 byte); otherwise 4096 quanta, each
      plan's bytes rounded up to whole quanta (never over budget, at most one quantum lost per
      layer). Fixes the greedy's coarse-hull cases (few layers, large steps).
    * Refinement of either: while some layer can move to a faster Pareto plan within its bytes
      plus the leftover budget, apply the single move with the largest reduction.

    Cost: one :func:`layer_frontier` per layer (``O(N⁴k²)`` flops in BLAS; one in total with
    ``average``), the DP ``O(L·P·4096)`` with ``P`` ≈ a few hundred Pareto plans per layer.

    With ``fpool`` (§3.6, temporal locality), each layer's F tier is a recency (LRU) pool
    described by its :class:`FPoolModel` and the frontier is :func:`layer_frontier_lru`'s
    (``O(N⁴k³)`` flops per layer in numpy); the plans carry ``order``, the expert ids of the
    static C/S/E ranks. ``counts`` is then only checked.

    Args:
        counts: ``[L, N]`` activation counts (tokens × selections per MoE layer and expert).
        k: experts per token, ``1..N``.
        total_budget_bytes: cache bytes for all layers' experts together, ``>= 0``.
        delay: the :class:`DelayModel` (one for all layers).
        average: plan every layer with the popularity vector averaged over layers (§3.1's robust
            version) instead of each layer's own.
        step: boundary grid step of :func:`layer_frontier`.
        shape: expected ``(L, N)`` of ``counts``, checked if given.
        fpool: per MoE layer, an :class:`FPoolModel` (recency F pools; see above), or None
            (static plans by popularity rank).

    Returns:
        :class:`ModelPlan` ``(layers, predicted_makespan_s)`` with
        ``Σ bytes <= total_budget_bytes``.

    Raises:
        ValueError: negative or non-finite budget, ``counts`` not ``[L, N]`` (or not ``shape``),
            negative counts, a layer with no activations, ``k`` out of range or larger than a
            layer's number of active experts, ``fpool`` not one model per layer or combined
            with ``average``.
        RuntimeError: a conditional-Poisson fit that does not converge.
    """
    total = check_budget(total_budget_bytes, "total_budget_bytes")
    fronts, orders = layer_fronts(counts, k, delay, average=average, step=step, shape=shape,
                                  fpool=fpool)
    return split_model(fronts, orders, total)


def layer_fronts(counts, k, delay: DelayModel, *, average: bool = False, step: int = 1,
                 shape: tuple[int, int] | None = None, fpool: list | None = None) -> tuple:
    """Every MoE layer's plans before the budget split: ``(fronts, orders)``, per layer a
    :class:`LayerFrontier` (each capacity's Pareto plans with ``fpool``, else all plans; not
    yet filtered to the layer's Pareto set, so that a restriction such as
    :func:`restrict_front` can still pick among them) and the static-tier orders per capacity
    (``orders`` None without ``fpool``). Arguments and errors as :func:`plan_model`."""
    c = np.asarray(counts)
    if c.ndim != 2:
        raise ValueError(f"counts must be [L, N], got shape {c.shape}")
    if shape is not None and tuple(c.shape) != tuple(shape):
        raise ValueError(f"counts has shape {c.shape}, expected {tuple(shape)}")
    n = c.shape[1]
    k = check_k(k, n)
    orders = None
    if fpool is not None:
        if average:
            raise ValueError("fpool (recency F pools) cannot be combined with average=True")
        if len(fpool) != c.shape[0]:
            raise ValueError(f"fpool has {len(fpool)} models for {c.shape[0]} layers")
        fronts, orders = [], []
        for m in fpool:
            f, o = layer_frontier_lru(m, k, delay, step, pareto=True)
            fronts.append(f)
            orders.append(o)
    else:
        pop = popularity_by_rank(c, average=average)
        rows = [pop] if average else list(pop)
        fronts = []
        for row in rows:
            w = fit_conditional_poisson(inclusion_probabilities(row, k), k)
            fronts.append(layer_frontier(w, k, delay, step))
        if average:
            fronts = fronts * c.shape[0]
    return fronts, orders


def split_model(fronts: list, orders, total_budget_bytes) -> ModelPlan:
    """The budget split of :func:`plan_model` over per-layer plans (``fronts``, ``orders`` as
    :func:`layer_fronts` returns them; each front is reduced to its Pareto set here).

    Raises:
        ValueError: negative or non-finite budget; a layer with no plan within the budget.
    """
    total = check_budget(total_budget_bytes, "total_budget_bytes")
    fronts = [f.pareto() for f in fronts]
    L = len(fronts)
    cands = []
    for cur in (split_greedy(fronts, total), split_dp(fronts, total)):
        cur = refine_split(fronts, cur, total)
        cost = sum(float(f.makespan_s[i]) for f, i in zip(fronts, cur))
        used = sum(float(f.bytes[i]) for f, i in zip(fronts, cur))
        if used <= total:
            cands.append((cost, used, cur))
    cur = min(cands, key=lambda c: (c[0], c[1]))[2]
    plans = [_plan_of(fronts[l], cur[l], orders[l] if orders else None) for l in range(L)]
    return ModelPlan(plans, float(sum(p.predicted_makespan_s for p in plans)))
