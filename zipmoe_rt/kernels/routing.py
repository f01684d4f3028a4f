"""Numba CPU kernels for the routers of sparse MoE blocks: top-k softmax routing
(``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter`` in transformers' modeling
files; :func:`route`) and the scored, grouped, biased and scaled routers of the DeepSeek / GLM
lineage (``DeepseekV2TopkRouter``, ``DeepseekV3TopkRouter``, ``Glm4MoeTopkRouter``;
:func:`route_grouped`); ERNIE 4.5's softmax router with a choice bias and a clamped
renormalisation (``Ernie4_5_MoeTopKRouter``; :func:`route_choice_bias`).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["route", "route_grouped", "route_choice_bias", "METHODS", "SCORINGS"]


# no fastmath: the sum order must not depend on memory layout; IEEE division (no exception on
# non-finite logits)
@njit(inline="always", error_model="numpy")
def _softmax_into(x, p):
    """``p[:] = softmax(x)`` in float32 (x: float32 [E] row of router logits; p: float32 [E]
    scratch): max-subtracted ``exp``, summed in index order, each divided by the sum
    (``softmax(router_logits, dtype=float32)`` of transformers' routers). Inlined into every
    router kernel, whose compile flags (no fastmath) keep the result bit-stable."""
    E = x.shape[0]
    m = x[0]
    for e in range(1, E):
        if x[e] > m:
            m = x[e]
    tot = np.float32(0.0)
    for e in range(E):
        p[e] = np.exp(x[e] - m)
        tot += p[e]
    for e in range(E):
        p[e] = p[e] / tot


@njit(nogil=True, cache=True, error_model="numpy")  # no fastmath, as _softmax_into
def _route(logits, k, renorm, idx, w):
    """Softmax over all experts (float32, :func:`_softmax_into`), top-k (descending, lowest
    index first on ties), optional renormalisation of the k weights. Compiled without fastmath
    so that the same logits always give the same weights, bit for bit (LLVM otherwise picks a
    vector or scalar summation depending on whether the scratch array aliases the input)."""
    T, E = logits.shape
    p = np.empty(E, np.float32)
    for t in range(T):
        _softmax_into(logits[t], p)
        s = np.float32(0.0)
        for j in range(k):
            best = -1
            bv = np.float32(-1.0)
            for e in range(E):
                if p[e] > bv:
                    bv = p[e]
                    best = e
            if best < 0:        # non-finite logits (NaN weights): the lowest expert not taken
                for e in range(E):
                    if p[e] != np.float32(-2.0):
                        bv = p[e]
                        best = e
                        break
            idx[t, j] = best
            w[t, j] = bv
            s += bv
            p[best] = np.float32(-2.0)
        if renorm:
            for j in range(k):
                w[t, j] = w[t, j] / s


def route(logits: np.ndarray, k: int, renorm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing as ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter``: softmax of the router
    logits in float32 over all experts, ``topk``, then (if ``renorm``) divide by the k-sum.

    Args:
        logits: float32 [T, E] router logits.  k: experts per token.  renorm: norm_topk_prob.
    Returns:
        (topk_idx int64 [T, k] in descending probability, lowest index first on ties;
        topk_w float32 [T, k]).
    """
    T = logits.shape[0]
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    _route(np.ascontiguousarray(logits, np.float32), k, renorm, idx, w)
    return idx, w


#: selection methods of :func:`route_grouped` (``topk_method`` of transformers' routers).
METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
#: scoring functions of :func:`route_grouped`.
SCORINGS = ("softmax", "sigmoid")


@njit(nogil=True, cache=True, error_model="numpy")  # no fastmath, as _softmax_into
def _route_grouped(logits, k, sigmoid, method, n_group, topk_group, bias, use_bias, renorm,
                   eps, scale, idx, w):
    """Score (softmax or sigmoid, float32), add the choice bias, keep ``topk_group`` of
    ``n_group`` groups (``method`` 1: by the group's largest choice score; 2: by the sum of its
    two largest), take the top-k of the kept choice scores (descending, lowest index first on
    ties), gather the unbiased scores, renormalise (``sum + eps``) and scale."""
    T, E = logits.shape
    gsize = E // n_group
    p = np.empty(E, np.float32)
    c = np.empty(E, np.float32)
    gs = np.empty(n_group, np.float32)
    keep = np.empty(n_group, np.bool_)
    for t in range(T):
        if sigmoid:
            for e in range(E):
                p[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[t, e]))
        else:
            _softmax_into(logits[t], p)
        for e in range(E):
            c[e] = p[e] + bias[e] if use_bias else p[e]
        if method > 0 and n_group > 1:
            for g in range(n_group):
                b1 = np.float32(-np.inf)
                b2 = np.float32(-np.inf)
                for e in range(g * gsize, (g + 1) * gsize):
                    v = c[e]
                    if v > b1:
                        b2 = b1
                        b1 = v
                    elif v > b2:
                        b2 = v
                gs[g] = b1 if method == 1 else b1 + b2
                keep[g] = False
            for j in range(topk_group):
                best = -1
                for g in range(n_group):
                    if not keep[g] and (best < 0 or gs[g] > gs[best]):
                        best = g
                keep[best] = True
            for g in range(n_group):
                if not keep[g]:
                    for e in range(g * gsize, (g + 1) * gsize):
                        c[e] = -np.inf
        s = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                if c[e] != -np.inf and (best < 0 or c[e] > c[best]):
                    best = e
            idx[t, j] = best
            w[t, j] = p[best]
            s += p[best]
            c[best] = -np.inf
        if renorm:
            d = s + eps
            for j in range(k):
                w[t, j] = w[t, j] / d
        if scale != np.float32(1.0):
            for j in range(k):
                w[t, j] = w[t, j] * scale


def route_grouped(logits: np.ndarray, k: int, renorm: bool, scoring: str = "softmax",
                  method: str = "greedy", n_group: int = 1, topk_group: int = 1,
                  bias: np.ndarray | None = None, scale: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The routers of the DeepSeek / GLM lineage (``DeepseekV2TopkRouter``,
    ``DeepseekV3TopkRouter``, ``Glm4MoeTopkRouter`` in transformers' modeling files), in
    float32:

    1. ``scores = softmax(logits)`` or ``sigmoid(logits)`` (``scoring``);
    2. ``choice = scores + bias`` (``e_score_correction_bias``; ``scores`` without one);
    3. ``method`` ``"group_limited_greedy"`` (V2): the experts fall in ``n_group`` equal
       groups; only the ``topk_group`` groups with the largest ``max(choice)`` stay;
       ``"noaux_tc"`` (V3, GLM-4-MoE): the same with the group score the sum of the group's two
       largest choice scores; ``"greedy"``: every expert stays;
    4. the ``k`` experts with the largest kept choice scores (descending, lowest index first on
       ties: an order of its own, transformers' ``topk(sorted=False)`` promises none);
    5. their weights are the unbiased ``scores``; with ``renorm`` (``norm_topk_prob``) divided
       by their sum (plus ``1e-20`` for sigmoid scoring, as ``DeepseekV3TopkRouter``); then
       multiplied by ``scale`` (``routed_scaling_factor``).

    Arguments are checked by :func:`zipmoe_rt.backends.base.check_route`, not here.

    Args:
        logits: float32 [T, E].  k: experts per token.  renorm: bool.
        scoring: ``"softmax"`` or ``"sigmoid"``.  method: one of :data:`METHODS`.
        n_group, topk_group: groups, and groups kept (``E % n_group == 0``).
        bias: None or float32 [E].  scale: float, applied in float32.
    Returns:
        (topk_idx int64 [T, k], topk_w float32 [T, k]).
    """
    T, E = logits.shape
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    use_bias = bias is not None
    b = np.ascontiguousarray(bias, np.float32) if use_bias else np.zeros(E, np.float32)
    _route_grouped(np.ascontiguousarray(logits, np.float32), k, scoring == "sigmoid",
                   METHODS.index(method), n_group, topk_group, b, use_bias, renorm,
                   np.float32(1e-20 if scoring == "sigmoid" else 0.0), np.float32(scale), idx, w)
    return idx, w


# -- ERNIE 4.5 MoE ----------------------------------------------------------------------------

@njit(nogil=True, cache=True)  # no fastmath, as _route
def _route_choice_bias(logits, k, bias, norm_min, idx, w):
    """Softmax over all experts (float32, :func:`_softmax_into`), the k largest ``p + bias``
    (descending, lowest index first on ties), weights ``p`` divided by max(their sum,
    norm_min)."""
    T, E = logits.shape
    p = np.empty(E, np.float32)
    c = np.empty(E, np.float32)
    used = np.empty(E, np.bool_)
    for t in range(T):
        _softmax_into(logits[t], p)
        for e in range(E):
            c[e] = p[e] + bias[e]
            used[e] = False
        s = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                if not used[e] and (best < 0 or c[e] > c[best]):
                    best = e
            used[best] = True
            idx[t, j] = best
            w[t, j] = p[best]
            s += p[best]
        if s < norm_min:
            s = norm_min
        for j in range(k):
            w[t, j] = w[t, j] / s


def route_choice_bias(logits: np.ndarray, k: int, bias: np.ndarray, norm_min: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing as ``Ernie4_5_MoeTopKRouter``: softmax of the router logits in float32
    over all experts ``p``, ``topk(p + bias)``, weights ``p`` of the chosen experts divided by
    ``clamp(sum, min=norm_min)``.

    Args:
        logits: float32 [T, E] router logits.  k: experts per token.
        bias: float32 [E] (or [1, E]) choice bias (``e_score_correction_bias``).
        norm_min: the clamp of the weight sum (``moe_norm_min``).
    Returns:
        (topk_idx int64 [T, k] in descending ``p + bias``, lowest index first on ties;
        topk_w float32 [T, k]).
    """
    T = logits.shape[0]
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    _route_choice_bias(np.ascontiguousarray(logits, np.float32), k,
                       np.ascontiguousarray(bias, np.float32).reshape(-1),
                       np.float32(norm_min), idx, w)
    return idx, w
