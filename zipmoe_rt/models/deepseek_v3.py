"""DeepSeek-V3 (transformers ``models/deepseek_v3/modeling_deepseek_v3.py``,
``DeepseekV3ForCausalLM``): DeepSeek-V2's layers (:mod:`.deepseek_v2`, MLA with
``rope_interleave``) with ``DeepseekV3TopkRouter``: sigmoid scores, the F32
``e_score_correction_bias`` for the choice only (``noaux_tc``), renormalised with
``norm_topk_prob``, times ``routed_scaling_factor``.
"""
from __future__ import annotations

from . import deepseek_v2
from .routing import RoutingRule


class Model(deepseek_v2.Model):
    """``DeepseekV3ForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def routing_rule(self) -> RoutingRule:
        """Sigmoid scores, ``noaux_tc`` groups, ``norm_topk_prob``, ``routed_scaling_factor``."""
        a = self.args
        return RoutingRule(a.num_experts_per_tok, a.norm_topk_prob, "sigmoid", "noaux_tc",
                           a.n_group, a.topk_group, a.routed_scaling_factor)

    def router_bias(self, i):
        """Layer ``i``'s ``e_score_correction_bias`` [E] (kept F32 by the router)."""
        return self.weight("router_bias", i)
