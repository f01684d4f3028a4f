"""LFM2-MoE (transformers ``models/lfm2_moe/modeling_lfm2_moe.py``, LFM2-8B-A1B): per
``layer_types``, a gated short convolution (:class:`~zipmoe_rt.models.short_conv.ShortConv`,
``Lfm2MoeShortConv``, state in a :class:`~zipmoe_rt.models.cache.RecurrentCache`) or
grouped-query attention with per-head q/k RMSNorms (``Lfm2MoeAttention``, keys and values in a
:class:`~zipmoe_rt.models.cache.KVCache`); ``operator_norm`` / ``ffn_norm`` pre-norms
(``Lfm2MoeDecoderLayer``); a dense SwiGLU MLP (``Lfm2MoeMLP``) in the first
``num_dense_layers`` layers, else ``Lfm2MoeSparseMoeBlock`` with the sigmoid router of
``Lfm2MoeTopKRouter``; the final ``embedding_norm``.
"""
from __future__ import annotations

from ..families.lfm2_moe import CONV, RENORM_EPS
from . import base
from .routing import RoutingRule
from .short_conv import ShortConv


class Model(base.Model):
    """``Lfm2MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_attention(self, i, **options):
        """Layer ``i``'s token mixer: a :class:`~zipmoe_rt.models.short_conv.ShortConv` on
        ``conv`` layers (biases with ``conv_bias`` or where the source holds them), else
        attention with per-head q/k norms."""
        if self.args.layer_types[i] != CONV:
            return super().build_attention(i, **options)
        t = self.weight     # biases where conv_bias says so or the source holds them
        biases = ([t(k, i) for k in ("conv_in_bias", "conv_kernel_bias", "conv_out_bias")]
                  if self.args.conv_bias or self.has_weight("conv_in_bias", i) else [None] * 3)
        return ShortConv(self.args, i, t("conv_in", i), t("conv_kernel", i), t("conv_out", i),
                         *biases, backend=self.backend)

    def build_mlp(self, i):
        """Dense :class:`~zipmoe_rt.models.moe.MLP` in the first ``num_dense_layers`` layers,
        else the sparse block: sigmoid scores, the choice by scores + ``expert_bias`` (with
        ``use_expert_bias``), weights renormalised with ``sum + 1e-6`` (``norm_topk_prob``) and
        times ``routed_scaling_factor``."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        rule = RoutingRule(a.num_experts_per_tok, a.norm_topk_prob, scoring="sigmoid",
                           scale=float(a.routed_scaling_factor), renorm_eps=RENORM_EPS)
        bias = self.weight("router_bias", i) if a.use_expert_bias else None
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   a.norm_topk_prob, rule=rule, bias=bias)

    def state_values(self) -> int:
        """Values one copy of the conv layers' fixed state holds (all layers)."""
        return sum(l.attn.state_values() for l in self.layers if isinstance(l.attn, ShortConv))
