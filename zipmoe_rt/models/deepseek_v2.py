"""DeepSeek-V2 (transformers ``models/deepseek_v2/modeling_deepseek_v2.py``,
``DeepseekV2ForCausalLM``): Multi-head Latent Attention (:mod:`.mla`) in every layer; dense
``DeepseekV2MLP`` layers below ``first_k_dense_replace``, then ``DeepseekV2Moe``: the routed
experts chosen by ``DeepseekV2TopkRouter`` (softmax, ``greedy`` or ``group_limited_greedy``,
weights times ``routed_scaling_factor``, never renormalised) plus the shared experts, added
without a gate. DeepSeek-V3 and GLM-4-MoE-Lite subclass this module's :class:`Model`.
"""
from __future__ import annotations

from . import base
from .mla import build_mla
from .routing import RoutingRule


class Model(base.Model):
    """``DeepseekV2ForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_attention(self, i, **options):
        """Layer ``i``: :class:`~zipmoe_rt.models.mla.MLAttention` (latent KV cache)."""
        return build_mla(self, i)

    def routing_rule(self) -> RoutingRule:
        """DeepSeek-V2's rule: softmax scores, ``topk_method``, ``routed_scaling_factor``."""
        a = self.args
        return RoutingRule(a.num_experts_per_tok, False, "softmax", a.topk_method,
                           a.n_group or 1, a.topk_group or 1, a.routed_scaling_factor)

    def router_bias(self, i):
        """The router's choice bias of layer ``i`` (none in DeepSeek-V2)."""
        return None

    def build_mlp(self, i):
        """Layer ``i``: a dense MLP outside ``moe_layers``, else the sparse block with the
        shared experts (when ``n_shared_experts`` > 0) added as they are."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        shared = self.shared_mlp(i)
        rule = self.routing_rule()
        return base.SparseMoeBlock(self, i, self.weight("router", i), rule.top_k, rule.renorm,
                                   shared, rule=rule, bias=self.router_bias(i))
