"""The ``auto`` policy's choice per MoE layer: an LRU pool of full experts, planned C/S/E tiers,
or a mix of both, whichever the delay model predicts fastest (design note §3.8).

Every plan ``(nF, nC, nS, nE)`` of a layer is one of three kinds (:func:`layer_choice`):

* ``lru``: ``nF > 0`` and no static slot: a recency pool of full experts, every other use
  read and decoded (what ``zip-lru`` does, with the layer's own pool instead of one shared by
  all layers);
* ``tiers``: ``nF = 0``: only the planned C/S/E slots;
* ``mix``: both, an LRU pool of full experts inside the planned tiers;
* ``none``: nothing resident (every use read from flash).

:func:`plan_choices` prices them under one budget with one delay model: the budget split over
all of every layer's plans (each layer's choice free, ``auto``), and the splits restricted to
LRU pools only (``lru``) or to tiers only (``tiers``). ``auto`` is never predicted slower than
the restricted splits, since they choose among a subset of its plans; the figures say by how
much each single kind would lose. :func:`shared_pool_layer_s` prices the other engine,
``zip-lru``'s one LRU pool shared by all layers, replayed on the trace, so that ``auto`` can
run it where it is predicted faster than every per-layer plan.
"""
from __future__ import annotations

import numpy as np

from .frontier import LayerFrontier
from .plan import ModelPlan, layer_fronts, split_model

#: the kinds of layer plan, in the order summaries list them
CHOICES = ("lru", "mix", "tiers", "none")
#: one-letter code of each kind (:func:`choice_codes`)
CODES = {"lru": "L", "mix": "M", "tiers": "T", "none": "-"}


def layer_choice(plan) -> str:
    """``"lru"``, ``"mix"``, ``"tiers"`` or ``"none"`` for a plan with ``nF, nC, nS, nE``
    attributes (a :class:`~zipmoe_rt.engine.planner.TierPlan`); see the module docstring."""
    static = plan.nC + plan.nS + plan.nE
    if plan.nF > 0:
        return "mix" if static > 0 else "lru"
    return "tiers" if static > 0 else "none"


def choice_codes(plans) -> str:
    """One letter per MoE layer (``L`` lru, ``M`` mix, ``T`` tiers, ``-`` none), in layer
    order, e.g. ``"LLMMT"``."""
    return "".join(CODES[layer_choice(p)] for p in plans)


def choice_summary(plans) -> str:
    """How many layers took each kind, e.g. ``"lru 20, mix 6, tiers 4"`` (kinds with no layer
    left out; ``"no MoE layer"`` for an empty list)."""
    kinds = [layer_choice(p) for p in plans]
    parts = [f"{c} {kinds.count(c)}" for c in CHOICES if kinds.count(c)]
    return ", ".join(parts) if parts else "no MoE layer"


def restrict_front(front: LayerFrontier, kind: str) -> LayerFrontier:
    """The plans of ``front`` of one kind: ``"lru"`` (no static slot: ``nC = nS = nE = 0``)
    or ``"tiers"`` (``nF = 0``); ``"auto"`` keeps every plan. The empty plan (nothing
    resident) belongs to both, so a restricted front always has a plan of 0 bytes.

    Raises:
        ValueError: another ``kind``.
    """
    c = front.counts
    if kind == "auto":
        return front
    if kind == "lru":
        keep = c[:, 1:].sum(axis=1) == 0
    elif kind == "tiers":
        keep = c[:, 0] == 0
    else:
        raise ValueError(f"kind must be 'auto', 'lru' or 'tiers', got {kind!r}")
    return LayerFrontier(c[keep], front.bytes[keep], front.makespan_s[keep])


def shared_pool_layer_s(runs, n: int, k: int, capacity: int, delay) -> np.ndarray:
    """Expected one-token time of each MoE layer under one LRU pool of ``capacity`` full
    experts shared by all layers (the ``zip-lru`` engine: every use outside the pool read from
    flash and decoded, then admitted, evicting the least recently used expert of any layer).

    The pool is replayed on the trace's token sequences: per token, the layers in order; in a
    layer, the selected experts in the pool are hits (each moved to the most recent end, by
    ascending id), then the others are misses, admitted by ascending id. It carries over from
    one run to the next, as the engine's pool does. The runs are replayed twice and only the
    second pass is counted: the first warms the pool, so the figure is a long run's (a pool
    that starts empty would count the first use of every expert it will hold as a miss, a cost
    a run pays once; the per-layer pools it is compared with start warm,
    :func:`~zipmoe_rt.engine.planner.lru_pool_model`). Each layer's time is the mean of
    ``delay.layer_makespan({"F": hits, "miss": k − hits})`` over its tokens.

    Args:
        runs: int arrays ``[T, L, k]`` (the trace's ``sequences``).
        n: experts per layer.  k: experts per token.  capacity: experts the pool holds, ``>= 0``.
        delay: the :class:`~zipmoe_rt.engine.planner.DelayModel`.

    Returns:
        float64 ``[L]`` seconds (0 for a layer without tokens).

    Raises:
        ValueError: no runs, or runs that disagree in ``[L, k]``.
    """
    from collections import OrderedDict
    runs = [np.asarray(r, dtype=np.int64) for r in runs if np.asarray(r).size]
    if not runs:
        raise ValueError("runs: no tokens")
    L = runs[0].shape[1]
    if any(r.ndim != 3 or r.shape[1:] != runs[0].shape[1:] for r in runs):
        raise ValueError("runs must be [T, L, k] arrays of one [L, k]")
    cost = [delay.layer_makespan({"F": h, "miss": k - h}) for h in range(k + 1)]
    tot, cnt = np.zeros(L), np.zeros(L)
    pool: OrderedDict = OrderedDict()
    for counted in (False, True):          # a warming pass, then the counted one
        for r in runs:
            for tok in r:
                for layer in range(L):
                    sel = sorted(set(int(e) for e in tok[layer]))
                    hits = [e for e in sel if (layer, e) in pool]
                    for e in hits:
                        pool.move_to_end((layer, e))
                    for e in sel:
                        if (layer, e) in pool or capacity <= 0:
                            continue
                        if len(pool) >= capacity:
                            pool.popitem(last=False)
                        pool[(layer, e)] = None
                    if counted:
                        tot[layer] += cost[min(len(hits), k)]
                        cnt[layer] += 1
    return np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)


def plan_choices(counts, k, total_budget_bytes, delay, *, fpool: list | None = None,
                 step: int = 1) -> dict[str, ModelPlan]:
    """The model's plans under one budget: ``{"auto", "lru", "tiers"}`` -> :class:`ModelPlan`.

    ``auto``: :func:`~zipmoe_rt.engine.planner.plan_model`'s split over all plans of every
    layer, so each layer takes the kind (LRU pool, tiers, mix) the split finds fastest for
    the bytes it gets. ``lru`` / ``tiers``: the same split over only that kind's plans
    (:func:`restrict_front`). One frontier computation serves all three.

    Args:
        counts, k, total_budget_bytes, delay, fpool, step: as for
            :func:`~zipmoe_rt.engine.planner.plan_model`.

    Returns:
        dict of the three :class:`ModelPlan` (``predicted_makespan_s``: the MoE time of one
        token, summed over layers).

    Raises:
        ValueError: as :func:`~zipmoe_rt.engine.planner.plan_model`.
    """
    fronts, orders = layer_fronts(counts, k, delay, step=step, fpool=fpool,
                                  shape=np.asarray(counts).shape)
    return {kind: split_model([restrict_front(f, kind) for f in fronts], orders,
                              total_budget_bytes)
            for kind in ("auto", "lru", "tiers")}
