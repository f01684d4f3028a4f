"""LFM2-MoE (transformers ``models/lfm2_moe/modeling_lfm2_moe.py``): decoder layers of a
short convolution (:class:`~zipmoe_rt.models.shortconv.ShortConv`) or attention with per-head
q/k norms, pre-norm residual (``operator_norm``, ``ffn_norm``), dense SwiGLU MLPs in the first
``num_dense_layers`` layers and sparse blocks after them with ``Lfm2MoeTopKRouter``'s rule:
sigmoid scores, the F32 ``expert_bias`` added for the choice, the unbiased scores renormalised
and scaled by ``routed_scaling_factor`` (the shared ``noaux_tc`` rule with one group).
Hyper-parameters and names come from the registry entry (:mod:`zipmoe_rt.families.lfm2_moe`).
"""
from __future__ import annotations

import numpy as np

from . import base
from .routing import RoutingRule
from .shortconv import ShortConv


class Model(base.Model):
    """``Lfm2MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_attention(self, i, **options):
        """Layer ``i``'s operator: :class:`ShortConv` for a conv layer, else the shared
        attention (q/k norms per head)."""
        if not self.args.is_conv(i):
            return super().build_attention(i, **options)
        opt = self._opt
        return ShortConv(self.weight("conv_in", i), self.weight("conv_weight", i),
                         self.weight("conv_out", i), opt("conv_in_bias", i),
                         opt("conv_weight_bias", i), opt("conv_out_bias", i), self.backend)

    def build_mlp(self, i):
        """Dense :class:`~zipmoe_rt.models.moe.MLP` below ``num_dense_layers``, else the sparse
        block with LFM2's router (its expert bias only with ``use_expert_bias``)."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        router = self.weight("router", i)
        bias = (self.weight("router_bias", i) if a.use_expert_bias
                else np.zeros(router.shape[0], np.float32))
        rule = RoutingRule(a.num_experts_per_tok, a.norm_topk_prob, scoring="sigmoid",
                           method="noaux_tc", scale=a.routed_scaling_factor)
        return base.SparseMoeBlock(self, i, router, a.num_experts_per_tok, a.norm_topk_prob,
                                   rule=rule, bias=bias)
