"""The router of a sparse MoE block, one class for every family: router logits ``x @ W.T`` in
float32, then the family's routing rule through the backend's ``route`` op.

Rules (transformers' modeling files):

* softmax top-k, optionally renormalised: ``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``,
  ``Qwen3MoeTopKRouter``, ``OlmoeTopKRouter`` (the defaults);
* ``DeepseekV2TopkRouter``: softmax, ``topk_method`` ``greedy`` or ``group_limited_greedy``
  (``n_group`` groups, the ``topk_group`` with the largest maximum score eligible), weights
  times ``routed_scaling_factor``; transformers' V2 router never renormalises (its
  ``norm_topk_prob`` is unused), so a V2 family passes ``renorm=False``;
* ``DeepseekV3TopkRouter`` / ``Glm4MoeTopkRouter`` (``noaux_tc``): sigmoid scores, the float32
  ``e_score_correction_bias`` added for the choice only, groups ranked by the sum of their two
  largest choice scores, weights the unbiased scores, renormalised with ``norm_topk_prob`` and
  times ``routed_scaling_factor``;
* ``Lfm2MoeTopKRouter``: sigmoid scores, the float32 ``expert_bias`` added for the choice only
  (``use_expert_bias``), plain top-k (no groups), weights the unbiased scores divided by their
  sum plus 1e-6 (``norm_topk_prob``; ``renorm_eps``), times ``routed_scaling_factor``.

The sparse block (:class:`~zipmoe_rt.models.moe.SparseMoeBlock`) routes every token through its
:class:`Router`, and hands the choice to the model's executor: the default
:class:`~zipmoe_rt.models.moe.ExpertExecutor` or the budgeted engine
(:class:`~zipmoe_rt.engine.pipeline.ExpertEngine`), so both run the same experts with the same
weights, and the route hook (the planner's trace) sees them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends import get_backend, to_f32
from ..backends.base import check_route


@dataclass(frozen=True)
class RoutingRule:
    """How router logits become the k experts of a token and their weights (the arguments of
    :meth:`~zipmoe_rt.backends.base.Backend.route`).

    Attributes:
        top_k: experts per token (``num_experts_per_tok``).
        renorm: divide the k weights by their sum (``norm_topk_prob``).
        scoring: ``"softmax"`` or ``"sigmoid"`` (V3 / GLM).
        method: ``"greedy"``, ``"group_limited_greedy"`` (V2) or ``"noaux_tc"`` (V3 / GLM).
        n_group, topk_group: expert groups and groups kept (``n_group`` / ``topk_group``).
        scale: ``routed_scaling_factor`` (1.0 = none).
        renorm_eps: None (the backend's rule: 1e-20 with sigmoid scores, as V3 / GLM) or the
            epsilon added to the sum of the k weights before the division (LFM2: 1e-6).
    """

    top_k: int
    renorm: bool = False
    scoring: str = "softmax"
    method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scale: float = 1.0
    renorm_eps: float | None = None      # LFM2-MoE

    def check(self, num_experts: int, bias=None) -> None:
        """Raise ValueError when the rule cannot route ``num_experts`` experts (with ``bias``):
        :func:`~zipmoe_rt.backends.base.check_route`."""
        check_route(num_experts, self.top_k, self.scoring, self.method, self.n_group,
                    self.topk_group, bias, self.scale)


class Router:
    """Router logits and routing decisions of one MoE layer.

    Args:
        weight: router weight [E, H] (``mlp.gate.weight``; BF16 bits, float16 or float32 — the
            V3 / GLM routers are float32 in released checkpoints).
        rule: :class:`RoutingRule`.
        bias: None or the [E] choice bias (``e_score_correction_bias``), taken as float32
            (released checkpoints store it as F32; other dtypes are widened exactly).
        backend: compute backend (default numba).
        logit_bias: None or the [E] bias of the router's linear layer (gpt-oss's
            ``GptOssTopKRouter``: ``F.linear(x, weight, bias)``), widened to float32.
    Raises:
        ValueError: the rule does not fit the weight's E (:meth:`RoutingRule.check`), or a bias
            of another length.
    """

    def __init__(self, weight, rule: RoutingRule, bias=None, backend=None, logit_bias=None):
        be = self.backend = get_backend(backend)
        self.weight = be.from_host(np.ascontiguousarray(weight))
        self.logit_bias = None
        if logit_bias is not None:
            lb = to_f32(logit_bias).reshape(-1)
            if lb.size != self.weight.shape[0]:
                raise ValueError(f"router logit bias has {lb.size} values for "
                                 f"{self.weight.shape[0]} experts")
            self.logit_bias = be.from_host(np.ascontiguousarray(lb))
        self.rule = rule
        self.bias = None if bias is None else np.ascontiguousarray(to_f32(bias))
        self.num_experts = int(self.weight.shape[0])
        rule.check(self.num_experts, bias)

    def logits(self, x):
        """float32 [T, E] router logits ``x @ weight.T (+ logit_bias)`` for x float32 [T, H]
        (backend arrays)."""
        return self.backend.linear(x, self.weight, self.logit_bias)

    def select(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """The rule applied to router logits float32 [T, E]: host (topk_idx int64 [T, k],
        topk_w float32 [T, k]) (:meth:`~zipmoe_rt.backends.base.Backend.route`)."""
        r = self.rule
        if r.renorm_eps is not None and r.renorm:     # LFM2: w / (sum(w) + eps) * scale
            idx, w = self.backend.route(logits, r.top_k, False, scoring=r.scoring,
                                        method=r.method, n_group=r.n_group,
                                        topk_group=r.topk_group, bias=self.bias)
            w = np.asarray(w, np.float32)
            w = w / (w.sum(axis=-1, keepdims=True) + np.float32(r.renorm_eps))
            if r.scale != 1.0:
                w = w * np.float32(r.scale)
            return idx, w.astype(np.float32)
        if (r.scoring, r.method, r.scale) == ("softmax", "greedy", 1.0) and self.bias is None:
            return self.backend.route(logits, r.top_k, r.renorm)
        return self.backend.route(logits, r.top_k, r.renorm, scoring=r.scoring, method=r.method,
                                  n_group=r.n_group, topk_group=r.topk_group, bias=self.bias,
                                  scale=r.scale)

    def __call__(self, x):
        """x float32 [T, H] -> (logits float32 [T, E], topk_idx int64 [T, k], topk_w float32
        [T, k])."""
        logits = self.logits(x)
        idx, w = self.select(logits)
        return logits, idx, w
