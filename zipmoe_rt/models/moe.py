"""Feed-forward blocks: the dense SwiGLU MLP, the sparse MoE block (router -> executor, optional
shared expert) and the default expert executor, with the one routine that accumulates routed
experts (:func:`accumulate_experts`), shared by :class:`ExpertExecutor` and the budgeted engine
(:class:`zipmoe_rt.engine.pipeline.ExpertEngine`) so both sum in the same order, bit for bit.

The math follows transformers' ``MixtralSparseMoeBlock`` / ``MixtralExperts``
(``modeling_mixtral.py``), ``Qwen2MoeSparseMoeBlock`` / ``Qwen2MoeMLP`` (``modeling_qwen2_moe.py``),
``Qwen3MoeSparseMoeBlock`` (``modeling_qwen3_moe.py``) and ``DeepseekV3MoE`` (the shared experts
added without a gate; ``modeling_deepseek_v3.py``), in float32 on the model's backend; the
routing rules are in :mod:`zipmoe_rt.models.routing`.
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

import numpy as np

from ..backends import get_backend, to_f32
from .routing import Router, RoutingRule


class MLP:
    """Dense SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (``Qwen2MoeMLP``; also the shared expert).

    Args:
        gate, up: [I, H]; down: [H, I] (BF16 bits, float16 or float32).
        backend: compute backend (default numba).
    """

    def __init__(self, gate, up, down, backend=None):
        be = self.backend = get_backend(backend)
        self.gate, self.up, self.down = (be.from_host(np.ascontiguousarray(a))
                                         for a in (gate, up, down))

    def __call__(self, x):
        """x float32 [T, H] -> float32 [T, H]."""
        be = self.backend
        return be.linear(be.swiglu(x, self.gate, self.up), self.down)


def accumulate_experts(backend, x, topk_idx: np.ndarray, topk_w: np.ndarray,
                       fetch: Callable[[int], object],
                       prepare: Callable[[list, dict], None] | None = None, window: int = 0,
                       after_compute: Callable[[float], None] | None = None, glu=None):
    """``out[t] = sum_j topk_w[t, j] * expert_{topk_idx[t, j]}(x[t])`` in the summation order of
    ``MixtralExperts.forward``, whatever supplies the expert weights.

    * One token: its distinct experts are fetched in ascending index order, then all go through
      one ``backend.experts_token`` call (weights in the same ascending order).
    * Several tokens: experts in ascending index order, each added to the rows routed to it with
      ``backend.expert_accumulate`` as soon as it is fetched.

    Args:
        backend: a :class:`~zipmoe_rt.backends.base.Backend`.
        x: float32 [T, H] backend array.  topk_idx: host int64 [T, k].  topk_w: host float32
            [T, k].
        fetch: ``fetch(e) -> ExpertWeights`` of expert ``e`` of the layer (called once per
            distinct expert, in the order the experts are computed).
        prepare: optional ``prepare(experts, work)`` called before the fetches of each group of
            experts (all of them for one token, else ``window`` at a time): ``experts`` is a
            list of ints (ascending), ``work`` maps each to the number of rows routed to it
            (1 for one token). Lets an engine start loading them.
        window: experts per prepared group for several tokens; 0 = all at once.
        after_compute: optional ``after_compute(seconds)`` called after each compute call with
            the time it took.
        glu: None (SwiGLU experts) or a :class:`~zipmoe_rt.backends.base.ClampedSwiGLU`
            (gpt-oss's biased experts), passed to ``experts_token`` / ``expert_accumulate``.
    Returns:
        float32 [T, H] backend array.
    Raises:
        whatever ``fetch`` / ``prepare`` raise (e.g. KeyError for a missing expert).
    """
    T = topk_idx.shape[0]
    out = backend.zeros((T, x.shape[1]))
    act = {} if glu is None else {"glu": glu}
    if T == 1:
        order = np.argsort(topk_idx[0], kind="stable")
        experts = [int(topk_idx[0, j]) for j in order]
        uniq = sorted(set(experts))
        if prepare is not None:
            prepare(uniq, {e: 1 for e in uniq})
        got = {e: fetch(e) for e in uniq}
        t0 = time.perf_counter()
        backend.experts_token(out[0], x[0], [got[e] for e in experts], topk_w[0, order], **act)
        if after_compute is not None:
            after_compute(time.perf_counter() - t0)
        return out
    uniq = [int(e) for e in np.unique(topk_idx)]
    work = {e: int((topk_idx == e).sum()) for e in uniq} if prepare is not None else None
    step = window if window > 0 else max(len(uniq), 1)
    for i in range(0, len(uniq), step):
        group = uniq[i:i + step]
        if prepare is not None:
            prepare(group, work)
        for e in group:
            w = fetch(e)
            rows, slots = np.nonzero(topk_idx == e)
            t0 = time.perf_counter()
            backend.expert_accumulate(out, x, rows.astype(np.int64), topk_w[rows, slots], w,
                                      **act)
            if after_compute is not None:
                after_compute(time.perf_counter() - t0)
    return out


class Executor(Protocol):
    """What :class:`SparseMoeBlock` calls to compute the routed experts."""

    def run(self, layer: int, x, topk_idx: np.ndarray, topk_w: np.ndarray, glu=None):
        """``out[t] = sum_j topk_w[t, j] * expert_{topk_idx[t, j]}(x[t])``.

        Args:
            layer: decoder layer index.  x: float32 [T, H] (post-attention-norm hidden states,
                a backend array).
            topk_idx: host int64 [T, k].  topk_w: host float32 [T, k].
            glu: None, or the experts' :class:`~zipmoe_rt.backends.base.ClampedSwiGLU`
                (gpt-oss; passed only by blocks that have one).
        Returns:
            float32 [T, H] backend array.
        """


class ExpertExecutor:
    """The default :class:`Executor`: for each distinct selected expert (ascending index, as
    ``MixtralExperts.forward`` loops), fetch ``source.expert(layer, e)`` and add its weighted
    output to the rows routed to it (one token: all k experts in one fused call), through
    :func:`accumulate_experts`. No caching of its own: the source decides.

    Args:
        source: a :class:`~zipmoe_rt.models.weights.WeightSource`.
        backend: compute backend (default numba).
    Attributes:
        calls: number of ``source.expert`` fetches so far (statistics).
    """

    def __init__(self, source, backend=None):
        self.source = source
        self.backend = get_backend(backend)
        self.calls = 0

    def run(self, layer, x, topk_idx, topk_w, glu=None):
        """See :meth:`Executor.run`. Raises KeyError when the source lacks an expert."""
        def fetch(e):
            w = self.source.expert(layer, e)
            self.calls += 1
            return w

        return accumulate_experts(self.backend, x, topk_idx, topk_w, fetch, glu=glu)


#: route hook signature: (layer, x [T,H], router_logits [T,E], topk_idx [T,k], topk_w [T,k]).
RouteHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


class SparseMoeBlock:
    """Sparse MoE feed-forward (``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock`` /
    ``Qwen3MoeSparseMoeBlock`` / ``DeepseekV3MoE`` / ``Glm4MoeMoE``): the layer's
    :class:`~zipmoe_rt.models.routing.Router` (float32 router logits ``x @ gate.T``, then the
    routing rule), the routed experts through ``model.executor``, plus an optional shared
    expert, scaled by ``sigmoid(x @ shared_expert_gate.T)`` when there is such a gate
    (Qwen2-MoE), added as it is otherwise (``DeepseekV3MoE``: ``experts(x) + shared_experts(x)``).

    Args:
        model: the owning :class:`~zipmoe_rt.models.model.Model` (its ``backend`` is read once;
            its ``executor`` and ``route_hook`` per call, so they can be swapped after
            construction).
        layer: index.  gate: router weight [E, H].  top_k: experts per token.
        renorm: norm_topk_prob.  shared: optional :class:`MLP`.  shared_gate: optional [1, H].
        rule: optional :class:`~zipmoe_rt.models.routing.RoutingRule` (scoring, groups, scale);
            default softmax top-k with ``top_k`` and ``renorm`` (which must then agree with it).
        bias: optional [E] choice bias of the router (``e_score_correction_bias``).
        logit_bias: optional [E] bias added to the router logits (gpt-oss's router).
        glu: None (SwiGLU experts) or a :class:`~zipmoe_rt.backends.base.ClampedSwiGLU`
            handed to the executor (gpt-oss's biased experts).
    Raises:
        ValueError: a rule whose top_k / renorm disagree with the arguments, or one that cannot
            route this many experts.
    """

    def __init__(self, model, layer, gate, top_k, renorm, shared=None, shared_gate=None,
                 rule: RoutingRule | None = None, bias=None, logit_bias=None, glu=None):
        self.model, self.layer = model, layer
        be = self.backend = model.backend
        if rule is None:
            rule = RoutingRule(int(top_k), bool(renorm))
        elif (rule.top_k, rule.renorm) != (int(top_k), bool(renorm)):
            raise ValueError(f"layer {layer}: routing rule {rule} disagrees with top_k {top_k}, "
                             f"renorm {renorm}")
        self.router = Router(gate, rule, bias, be, logit_bias=logit_bias)
        self.glu = glu
        self.gate = self.router.weight
        self.top_k, self.renorm = rule.top_k, rule.renorm
        self.shared = shared
        self.shared_gate = None if shared_gate is None else be.from_host(
            np.ascontiguousarray(shared_gate))

    def router_logits(self, x):
        """float32 [T, E] router logits for x float32 [T, H] (usable for look-ahead)."""
        return self.router.logits(x)

    def select(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """Routing decisions for float32 [T, E] router logits: host (topk_idx int64 [T, k],
        topk_w float32 [T, k]); here the router's rule (:meth:`Router.select`). A block with a
        router of its own (PhiMoE's sparsemixer) overrides it."""
        return self.router.select(logits)

    def route(self, x):
        """The routing decision for x float32 [T, H]: (logits float32 [T, E], host topk_idx
        int64 [T, k], host topk_w float32 [T, k]), as :meth:`__call__` computes it."""
        logits = self.router_logits(x)
        idx, w = self.select(logits)
        return logits, idx, w

    def __call__(self, x):
        """x float32 [T, H] -> float32 [T, H]."""
        be = self.backend
        logits, idx, w = self.route(x)
        hook = self.model.route_hook
        if hook is not None:
            hook(self.layer, x, logits, idx, w)
        if self.glu is None:
            y = self.model.executor.run(self.layer, x, idx, w)
        else:
            y = self.model.executor.run(self.layer, x, idx, w, glu=self.glu)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is None:
                be.add_(y, s)
            else:
                be.sigmoid_gate_add_(y, be.linear(x, self.shared_gate), s)
        return y


# -- ERNIE 4.5 MoE ----------------------------------------------------------------------------

class ChoiceBiasMoeBlock(SparseMoeBlock):
    """:class:`SparseMoeBlock` with ERNIE 4.5's router (``Ernie4_5_MoeTopKRouter``,
    ``modeling_ernie4_5_moe.py``): softmax over all experts ``p``, the top-k of ``p + bias``
    (the bias for the choice only), weights ``p`` divided by ``max(sum, norm_min)``
    (``backend.route_choice_bias``). Shared experts are added ungated.

    Args:
        model, layer, gate, top_k, shared: as :class:`SparseMoeBlock`.
        bias: [E] or [1, E] choice bias (``moe_statics.e_score_correction_bias``, any float
            dtype or BF16 bits; widened to float32).
        norm_min: the clamp of the weight sum (``moe_norm_min``).
    Raises:
        ValueError: ``bias`` not of E values.
    """

    def __init__(self, model, layer, gate, top_k, bias, norm_min: float, shared=None):
        super().__init__(model, layer, gate, top_k, True, shared)
        b = to_f32(bias).reshape(-1)
        if b.size != self.gate.shape[0]:
            raise ValueError(f"layer {layer}: the choice bias has {b.size} values for "
                             f"{self.gate.shape[0]} experts")
        self.choice_bias = self.backend.from_host(b)
        self.norm_min = float(norm_min)

    def select(self, logits):
        """See :meth:`SparseMoeBlock.select` (``backend.route_choice_bias``)."""
        return self.backend.route_choice_bias(logits, self.top_k, self.choice_bias,
                                              self.norm_min)
