"""Qwen3-Next (transformers ``models/qwen3_next/modeling_qwen3_next.py``): a hybrid decoder
whose ``layer_types`` choose, per layer, Gated DeltaNet linear attention
(:class:`~zipmoe_rt.models.linear_attention.GatedDeltaNet`, state in a
:class:`~zipmoe_rt.models.cache.RecurrentCache`) or gated full attention
(:class:`~zipmoe_rt.models.linear_attention.GatedAttention`, keys and values in a
:class:`~zipmoe_rt.models.cache.KVCache`); zero-centred RMSNorms (``Qwen3NextRMSNorm``, the
weight applied as ``1 + w``) on the residual stream and on q/k; partial rotary; a sparse block
with the sigmoid-gated shared expert (``Qwen3NextSparseMoeBlock`` = Qwen2-MoE's), dense
``Qwen3NextMLP`` layers outside ``moe_layers``.
"""
from __future__ import annotations

import numpy as np

from ..backends import to_f32
from ..families.qwen3_next import LINEAR
from . import base
from .linear_attention import GatedAttention, GatedDeltaNet, split_qkvz
from .model import Norm


def centred(w) -> np.ndarray:
    """A zero-centred norm weight as the factor it applies: float32 ``1 + w`` (computed as
    ``GemmaRMSNorm`` does, ``1.0 + weight.float()``)."""
    return to_f32(w) + np.float32(1.0)


class Model(base.Model):
    """``Qwen3NextForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_norm(self, key, layer=None):
        """A zero-centred RMSNorm (``Qwen3NextRMSNorm``): weight ``1 + w``."""
        return Norm(centred(self.weight(key, layer)), self.args.rms_norm_eps,
                    backend=self.backend)

    def linear_projections(self, i: int):
        """(w_qkv, w_z, w_ba) of linear layer ``i`` in the layout
        :class:`~zipmoe_rt.models.linear_attention.GatedDeltaNet` takes (Qwen3-Next's fused
        ``in_proj_qkvz`` / ``in_proj_ba`` reordered by :func:`split_qkvz`)."""
        a = self.args
        return split_qkvz(self.weight("lin_qkvz", i), self.weight("lin_ba", i),
                          a.linear_num_key_heads, a.linear_num_value_heads,
                          a.linear_key_head_dim, a.linear_value_head_dim)

    def build_attention(self, i, **options):
        """Layer ``i``'s token mixer: a Gated DeltaNet on ``linear_attention`` layers, else
        gated attention with zero-centred q/k norms (and biases with ``attention_bias``)."""
        a, t = self.args, self.weight
        if a.layer_types[i] == LINEAR:
            return GatedDeltaNet(a, i, *self.linear_projections(i), t("lin_conv", i),
                                 t("lin_A_log", i), t("lin_dt_bias", i), t("lin_norm", i),
                                 t("lin_out", i), backend=self.backend)
        kw = {}
        if a.attention_bias:
            kw = {k: t("attn_" + k[1] + "_bias", i) for k in ("bq", "bk", "bv", "bo")}
        return GatedAttention(a, i, t("attn_q", i), t("attn_k", i), t("attn_v", i),
                              t("attn_o", i), q_norm=centred(t("attn_q_norm", i)),
                              k_norm=centred(t("attn_k_norm", i)), backend=self.backend,
                              **kw, **options)

    def build_mlp(self, i):
        """Dense :class:`~zipmoe_rt.models.moe.MLP` outside ``moe_layers``, else the sparse
        block with the sigmoid-gated shared expert."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        shared = shared_gate = None
        if a.shared_expert_intermediate_size > 0:
            shared = self.dense_mlp(i, ("shared_gate", "shared_up", "shared_down"))
            shared_gate = self.weight("shared_expert_gate", i)
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   a.norm_topk_prob, shared, shared_gate)

    def state_values(self) -> int:
        """Values one copy of the linear layers' fixed state holds (all layers)."""
        return sum(l.attn.state_values() for l in self.layers
                   if isinstance(l.attn, GatedDeltaNet))
