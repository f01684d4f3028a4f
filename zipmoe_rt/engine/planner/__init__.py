"""Cache-pool planning: how many experts of each layer to keep in each cache tier (ZipMoE §3).

Pure numpy, no I/O. The engine profiles a :class:`DelayModel`, records an activation trace
(``counts[l, e]`` = tokens that selected expert ``e`` in MoE layer ``l``) and calls
:func:`plan_model`; everything else here is the maths behind it, exposed so that it can be tested
piece by piece against brute force.

The pipeline (design note ``ZIPMOE.md`` §3, after ZipMoE, arXiv 2601.21198), one module each:

1. :func:`popularity_by_rank`: each layer's counts sorted descending and normalised (§3.1).
2. :func:`inclusion_probabilities`: scaled to ``π`` with ``Σπ = k`` (the true top-k), capped at 1
   (§3.2).
3. :func:`fit_conditional_poisson`: weights ``w`` of the conditional-Poisson (maximum-entropy)
   design ``P(S) ∝ Π_{i∈S} w_i`` over ``|S| = k`` whose inclusion probabilities are ``π``, by the
   IPF fixed point ``w ← w·π/π(w)`` (taken on the odds, damped); ``π(w)`` from
   elementary-symmetric-polynomial DPs (§3.3).
4. :func:`pool_hit_distribution`: pools are consecutive rank ranges (tiers F, C, S, E, miss, most
   popular first); hits per pool = independent Poisson-binomials (Bernoulli ``p = w/(1+w)``)
   conditioned on a total of ``k`` (§3.4). Steps 1-4: :mod:`.conditional_poisson`.
5. :class:`DelayModel` (:mod:`.delay`) and :func:`expected_layer_makespan`:
   ``Σ_h P(h)·makespan(h)``; :func:`layer_frontier` prices every plan of a layer at once
   (:mod:`.frontier`); :func:`plan_layer` picks the fastest under a byte budget (§3.5);
   :func:`plan_model` (:mod:`.plan`) splits one model-wide budget over the layers (all four
   tiers, the true k, per-layer budgets, as §3 asks) with the knapsack solvers of :mod:`.split`.
6. Temporal locality (§3.6; the conditional-Poisson design is memoryless, real routers are not:
   an expert used by one token is used again by the next with probability ``ρ`` ≈ 0.3-0.6,
   :func:`repeat_probability`). The engine's F tier is a recency (LRU) pool of ``nF`` experts
   on top of static C/S/E slots; :class:`FPoolModel` gives its hits per capacity, replayed on
   the trace's token sequences (:func:`lru_pool_model`) or from ``π`` and ``ρ`` by a mixture
   formula (:func:`locality_pool_model`); :func:`layer_frontier_lru` prices every plan with
   it (:mod:`.locality`), and :func:`plan_model` (``fpool=``) splits the budget as in step 5.

Argument checks shared by these modules live in :mod:`.checks`.

Tier names used throughout: ``"F"`` (full BF16), ``"C"`` (sign+mantissa + compressed exponent),
``"S"`` (sign+mantissa only), ``"E"`` (compressed exponent only), ``"miss"`` (nothing) (§2).
"""
from __future__ import annotations

from .conditional_poisson import (cp_inclusion, elementary_symmetric,
                                  elementary_symmetric_leave_one_out, fit_conditional_poisson,
                                  inclusion_probabilities, poisson_binomial, pool_hit_distribution,
                                  popularity_by_rank)
from .delay import TIERS, DelayModel
from .frontier import LayerFrontier, expected_layer_makespan, layer_frontier
from .locality import (ADMISSION_WINDOW, FPoolModel, admission_window, layer_frontier_lru,
                       locality_pool_model, lru_pool_model, repeat_probability)
from .plan import ModelPlan, TierPlan, plan_layer, plan_model
from .split import lower_hull

__all__ = [
    "TIERS",
    "popularity_by_rank",
    "inclusion_probabilities",
    "elementary_symmetric",
    "elementary_symmetric_leave_one_out",
    "cp_inclusion",
    "fit_conditional_poisson",
    "poisson_binomial",
    "pool_hit_distribution",
    "DelayModel",
    "expected_layer_makespan",
    "TierPlan",
    "LayerFrontier",
    "layer_frontier",
    "plan_layer",
    "FPoolModel",
    "ADMISSION_WINDOW",
    "admission_window",
    "repeat_probability",
    "lru_pool_model",
    "locality_pool_model",
    "layer_frontier_lru",
    "ModelPlan",
    "plan_model",
    "lower_hull",
]
