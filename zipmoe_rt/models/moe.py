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
from ..backends.base import check_act
from .routing import Router, RoutingRule


def expert_act(source) -> str:
    """The activation of a weight source's experts and gated MLPs: its hyper-parameters'
    ``hidden_act`` (``"silu"`` when absent; Gemma 4: ``"gelu_pytorch_tanh"``), a name of
    :data:`~zipmoe_rt.backends.base.ACTIVATIONS`."""
    return str((getattr(source, "hparams", None) or {}).get("hidden_act") or "silu")


class MLP:
    """Dense SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (``Qwen2MoeMLP``; also the shared expert),
    or with another gate activation (``Gemma4TextMLP``: GELU-tanh).

    Args:
        gate, up: [I, H]; down: [H, I] (BF16 bits, float16 or float32).
        backend: compute backend (default numba).
        act: the gate activation, a name of :data:`~zipmoe_rt.backends.base.ACTIVATIONS`.
    Raises:
        ValueError: an unknown ``act``.
    """

    def __init__(self, gate, up, down, backend=None, act: str = "silu"):
        be = self.backend = get_backend(backend)
        check_act(act)
        self.act = act
        self.gate, self.up, self.down = (be.linear_weight(a) for a in (gate, up, down))

    def __call__(self, x):
        """x float32 [T, H] -> float32 [T, H]."""
        be = self.backend
        if self.act == "silu":
            return be.linear(be.swiglu(x, self.gate, self.up), self.down)
        return be.linear(be.swiglu(x, self.gate, self.up, self.act), self.down)


def accumulate_experts(backend, x, topk_idx: np.ndarray, topk_w: np.ndarray,
                       fetch: Callable[[int], object],
                       prepare: Callable[[list, dict], None] | None = None, window: int = 0,
                       after_compute: Callable[[float], None] | None = None, act: str = "silu",
                       glu=None):
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
        act: the experts' gate activation (:func:`expert_act`; ``"silu"`` by default).
        glu: None (gated experts with ``act``) or a :class:`~zipmoe_rt.backends.base.ClampedSwiGLU`
            (gpt-oss's biased experts), passed to ``experts_token`` / ``expert_accumulate``.
        glu: None (SwiGLU experts) or a :class:`~zipmoe_rt.backends.base.ClampedSwiGLU`
            (gpt-oss's biased experts), passed to ``experts_token`` / ``expert_accumulate``.
    Returns:
        float32 [T, H] backend array.
    Raises:
        whatever ``fetch`` / ``prepare`` raise (e.g. KeyError for a missing expert).
    """
    T = topk_idx.shape[0]
    out = backend.zeros((T, x.shape[1]))
    kw = {} if glu is None else {"glu": glu}        # the backends' defaults otherwise
    if act != "silu":
        kw["act"] = act
    if T == 1:
        order = np.argsort(topk_idx[0], kind="stable")
        experts = [int(topk_idx[0, j]) for j in order]
        uniq = sorted(set(experts))
        if prepare is not None:
            prepare(uniq, {e: 1 for e in uniq})
        got = {e: fetch(e) for e in uniq}
        t0 = time.perf_counter()
        backend.experts_token(out[0], x[0], [got[e] for e in experts], topk_w[0, order], **kw)
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
                                      **kw)
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
        source: a :class:`~zipmoe_rt.models.weights.WeightSource` (its ``hidden_act`` gives the
            experts' activation, :func:`expert_act`).
        backend: compute backend (default numba).
    Attributes:
        calls: number of ``source.expert`` fetches so far (statistics).
    """

    def __init__(self, source, backend=None):
        self.source = source
        self.backend = get_backend(backend)
        self.act = expert_act(source)
        self.calls = 0

    def run(self, layer, x, topk_idx, topk_w, glu=None):
        """See :meth:`Executor.run`. Raises KeyError when the source lacks an expert."""
        def fetch(e):
            w = self.source.expert(layer, e)
            self.calls += 1
            return w

        return accumulate_experts(self.backend, x, topk_idx, topk_w, fetch, act=self.act, glu=glu)


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


# -- Gemma 4 ----------------------------------------------------------------------------------

class ScaledRouterMoeBlock(SparseMoeBlock):
    """:class:`SparseMoeBlock` with Gemma 4's router and its own norms around the experts
    (``Gemma4TextRouter`` and the MoE half of ``Gemma4TextDecoderLayer.forward``,
    ``modeling_gemma4.py``), called on the layer's residual stream ``x``:

    * router logits ``proj(rmsnorm(x) * scale * hidden_size ** -0.5)``, the RMSNorm without a
      weight of its own (``with_scale=False``; ``scale`` serves as its weight);
    * float32 softmax over all experts, top-k, renormalised, each weight times
      ``per_expert_scale`` of its expert;
    * the experts (through the executor) on ``pre_norm(x)``, their sum through ``post_norm``.

    Args:
        model, layer, gate, top_k: as :class:`SparseMoeBlock` (the top-k always renormalised).
        scale: [H] ``router.scale``.  expert_scale: [E] ``router.per_expert_scale``.
        pre_norm, post_norm: the experts' input and output norms (callables float32 [T, H] ->
            [T, H], e.g. :class:`~zipmoe_rt.models.model.Norm`).
        eps: the router RMSNorm's epsilon.
    Raises:
        ValueError: ``scale`` not of H values or ``expert_scale`` not of E.
    """

    def __init__(self, model, layer, gate, top_k, scale, expert_scale, pre_norm, post_norm,
                 eps: float):
        super().__init__(model, layer, gate, top_k, True)
        E, H = self.gate.shape
        s, es = to_f32(scale).reshape(-1), to_f32(expert_scale).reshape(-1)
        if s.size != H or es.size != E:
            raise ValueError(f"layer {layer}: router scale has {s.size} values (hidden {H}), "
                             f"per_expert_scale {es.size} (experts {E})")
        self.scale = self.backend.from_host(s)
        self.expert_scale = np.ascontiguousarray(es)
        self.root = float(H) ** -0.5
        self.eps = np.float32(eps)
        self.pre_norm, self.post_norm = pre_norm, post_norm

    def router_logits(self, x):
        """float32 [T, E] logits of the residual stream x float32 [T, H]."""
        h = self.backend.rmsnorm(x, self.scale, self.eps)
        self.backend.scale_(h, self.root)
        return self.router.logits(h)

    def select(self, logits):
        """Softmax top-k renormalised, times ``per_expert_scale`` (host arrays)."""
        idx, w = self.router.select(logits)
        return idx, (w * self.expert_scale[idx]).astype(np.float32)

    def __call__(self, x):
        """x float32 [T, H] (the residual stream) -> ``post_norm(experts(pre_norm(x)))``."""
        logits, idx, w = self.route(x)
        xe = self.pre_norm(x)
        hook = self.model.route_hook
        if hook is not None:
            hook(self.layer, xe, logits, idx, w)
        return self.post_norm(self.model.executor.run(self.layer, xe, idx, w))
