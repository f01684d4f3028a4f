"""GLM-4-MoE (transformers ``models/glm4_moe/modeling_glm4_moe.py``, ``Glm4MoeForCausalLM``):
the shared attention (q/k/v biases, optional per-head q/k norms, partial rotary from the
rope's ``partial_rotary_factor``), dense ``Glm4MoeMLP`` layers outside ``moe_layers``, and
``Glm4MoeMoE`` elsewhere: ``Glm4MoeTopkRouter`` (noaux_tc, :mod:`zipmoe_rt.models.routing`)
over the routed experts plus the shared experts, added without a gate. Hyper-parameters and
tensor names come from the registry entry (:mod:`zipmoe_rt.families.glm4_moe`).
"""
from __future__ import annotations

from . import base


class Model(base.Model):
    """``Glm4MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_mlp(self, i):
        """Layer ``i``: dense :class:`~zipmoe_rt.models.moe.MLP` outside ``moe_layers``, else a
        :class:`~zipmoe_rt.models.moe.SparseMoeBlock` with the sigmoid, bias-corrected,
        grouped and scaled router and the shared experts (when ``n_shared_experts`` > 0)."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        rule = base.RoutingRule(a.num_experts_per_tok, a.norm_topk_prob, "sigmoid", "noaux_tc",
                                a.n_group, a.topk_group, a.routed_scaling_factor)
        shared = self.shared_mlp(i)
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   a.norm_topk_prob, shared, rule=rule,
                                   bias=self.weight("router_bias", i))
